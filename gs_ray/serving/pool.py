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

Every row of one ``generate`` call runs from the batch's padded width for the batch's largest
``max_new_tokens``, so a batch fits the model only if ``max(prompt) + max(max_new_tokens)`` does.
``plan_batches`` splits a batch into sub-batches that fit, so every request that fits the model
alone is answered, with the answer it gets alone (a long prompt with one new token and a short
prompt with 512 no longer make each other fail).

The prompt is rendered with the run's own ``data.template`` and tokenised as in training, so an
expert sees at inference exactly the prompt format it was trained on.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gs_ray.config import Config
from gs_ray.errors import UserError
from gs_ray.routing.router import ROUTER_JSON
from gs_ray.rundir import RunDir, expert_name

log = logging.getLogger(__name__)


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt too long


class ServingError(UserError):
    """A request or a run directory cannot be served; the message says which field or file.
    ``code``: OpenAI's error code where one applies (``CONTEXT_LENGTH_EXCEEDED``)."""

    label = "serving error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code

    def row(self) -> dict[str, str]:
        """The error as one row's answer: ``{"error": message[, "code": code]}``."""
        return {"error": str(self), **({"code": self.code} if self.code else {})}


MIXTURE = -1  # the "expert" of a generation by the experts' mixture (the ensemble), not one expert


@dataclass(frozen=True)
class Sampling:
    """How a sampled request generates (temperature > 0), in place of greedy decoding."""

    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class Mixture:
    """A request answered by the experts' mixture with these weights (``ensemble``)."""

    weights: list[float]


Mode = Sampling | Mixture | None  # None: greedy, batched with the other greedy requests


@dataclass
class Generation:
    """One answer: the expert that wrote it, its text, and how generation ended."""

    expert: int
    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)


def check_fits(n_prompt_tokens: int, max_new_tokens: int, max_positions: int | None) -> None:
    """Reject a prompt whose tokens plus ``max_new_tokens`` exceed the model's positions."""
    if max_positions is not None and n_prompt_tokens + max_new_tokens > max_positions:
        raise ServingError(
            f"prompt: {n_prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceed the "
            f"model's {max_positions} positions",
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def plan_batches(
    prompt_lens: Sequence[int], max_new_tokens: Sequence[int], max_positions: int | None
) -> list[list[int]]:
    """Split one batch into sub-batches (lists of row indices) that each fit the model.

    A sub-batch fits when ``max(prompt_lens) + max(max_new_tokens)`` over its rows is at most
    ``max_positions`` (``None``: no limit, one sub-batch). Every row that fits alone lands in a
    sub-batch that fits. Rows are taken longest prompt first, and a row joins the open sub-batch
    when the sub-batch still fits with it, else opens the next one: rows of similar length share
    a sub-batch, which also keeps the left padding short. A row that does not fit even alone
    raises ``ServingError`` (the caller checks rows before they join a batch).
    """
    n = len(prompt_lens)
    if len(max_new_tokens) != n:
        raise ServingError(f"{n} prompt lengths but {len(max_new_tokens)} max_new_tokens values")
    if max_positions is None:
        return [list(range(n))] if n else []
    for length, m in zip(prompt_lens, max_new_tokens, strict=True):
        check_fits(length, m, max_positions)
    # Longest first: the open sub-batch's width is its first row's length.
    order = sorted(range(n), key=lambda i: (-prompt_lens[i], i))
    groups: list[list[int]] = []
    width = steps = 0
    for i in order:
        if groups and width + max(steps, max_new_tokens[i]) <= max_positions:
            groups[-1].append(i)
            steps = max(steps, max_new_tokens[i])
        else:
            groups.append([i])
            width, steps = prompt_lens[i], max_new_tokens[i]
    return [sorted(g) for g in groups]


def chat_instruction(messages: Sequence[dict[str, str]]) -> str:
    """A chat as one instruction, for a model without a chat template: the messages' non-blank
    contents in order, a blank line apart."""
    return "\n\n".join(m["content"] for m in messages if m["content"].strip())


adapter_name = expert_name  # the peft adapter name of expert k inside an ``ExpertPool``

# The served models' names (the OpenAI ``model`` field; vLLM's LoRA module names in a bundle).
APP_NAME = "gs-ray"
MODEL = APP_NAME  # the routed model; "gs-ray/expert-K" names one expert, "gs-ray/ensemble" all
ENSEMBLE_MODEL = f"{APP_NAME}/ensemble"
GENERALIST_MODEL = f"{APP_NAME}/generalist"  # the fallback adapter: one LoRA on everything


def expert_model(k: int) -> str:
    """The OpenAI model name of expert k (naming it bypasses the router)."""
    return f"{APP_NAME}/expert-{k}"


def decide(p, fallback, generalist: int | None) -> dict:
    """The adapter a prompt gets and why, from the router's probabilities ``p``: the router's
    expert, or the generalist (index ``generalist``) where the calibrated confidence is below
    the fallback threshold (``routing/fallback.py``; ``fallback`` None: no generalist)."""
    expert = int(p.argmax())
    out = {
        "expert": expert,
        "router_expert": expert,
        "probs": [float(x) for x in p],
        "adapter": expert_model(expert),
        "fallback": False,
    }
    if fallback is None:
        return {
            **out,
            "reason": "routed: the router's most probable expert (this run has "
            "no generalist fallback)",
        }
    _, conf, back = fallback.route(p[None, :])
    if back[0]:
        out.update(expert=generalist, adapter=GENERALIST_MODEL, fallback=True)
    return {
        **out,
        "confidence": float(conf[0]),
        "reason": fallback.reason(float(conf[0]), bool(back[0])),
    }


class TurnLock:
    """The pool's lock: reentrant, and handed over in the order it was asked for, so that a
    generation that gives its turn back between two tokens (``give_turn``) lets every request
    waiting at that moment run first. ``waiting`` says how many threads wait for it."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: collections.deque[object] = collections.deque()

    def acquire(self, blocking: bool = True) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if not blocking and (self._owner is not None or self._queue):
                return False
            ticket = object()
            self._queue.append(ticket)
            while self._owner is not None or self._queue[0] is not ticket:
                self._cond.wait()
            self._queue.popleft()
            self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("TurnLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def waiting(self) -> int:
        return len(self._queue)

    def give_turn(self) -> bool:
        """Between two steps of a long generation (held once): if anyone waits, release, let
        all of them run, and take the lock back; True if the turn was given."""
        if not self._queue:
            return False
        self.release()
        self.acquire()
        return True

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _OwnRng:
    """A seeded generation's random state, kept apart from torch's global one while the
    generation gives its turn to others (``swap`` before and after a turn): its draws are
    those it would make alone, and it leaves no trace in the global state."""

    def __init__(self, seed: int | None, device: torch.device):
        self.seed, self.device = seed, device
        self.held = None  # the state not installed now: the outside one, or during a turn ours

    def _get(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def enter(self) -> None:
        if self.seed is not None:
            self.held = self._get()
            torch.manual_seed(self.seed)

    def swap(self) -> None:
        """Install the held state and hold the installed one (ours out, or back in)."""
        if self.seed is not None:
            installed = self._get()
            self._set(self.held)
            self.held = installed

    def leave(self) -> None:
        if self.seed is not None:
            self._set(self.held)


def _locked(method):
    """Run ``method`` holding the pool's lock (see ``ExpertPool.lock``)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class TextDeltas:
    """Token ids in, text out as it becomes final: ``add`` returns the text the new token adds
    (held back while the decoded text ends in an incomplete character, or would rewrite text
    already given out), ``finish`` the rest. The pieces join to ``decode(all ids)``, the text a
    non-streamed answer has."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self) -> str:
        text = self._text()
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class _TokenQueue:
    """A ``generate`` streamer (transformers' ``put`` / ``end`` protocol) that hands the new
    token ids of a batch-1 generation to another thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)


class SerialTokenizer:
    """A tokenizer whose calls take turns: a fast (Rust) tokenizer used from two threads at once
    can raise ("Already borrowed"), and the pool checks and renders requests beside a running
    generation, outside its model lock. Attributes pass through."""

    def __init__(self, tokenizer):
        self._tokenizer, self._lock = tokenizer, threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._tokenizer, name, value)

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)


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

        from gs_ray.core.models import (
            load_base_model,
            load_tokenizer,
            resolve_device,
            safe_adapter,
        )

        if not expert_paths:
            raise ServingError("an expert pool needs at least one expert adapter")
        self.cfg = cfg
        self.template = cfg.data.template
        self.device = torch.device(device) if device is not None else resolve_device("auto")
        tokenizer = load_tokenizer(base_path)
        tokenizer.padding_side = "left"  # generation continues every row at the same column
        self.tokenizer = SerialTokenizer(tokenizer)
        base = load_base_model(base_path, cfg.model, self.device)
        first = safe_adapter(expert_paths[0])
        model = PeftModel.from_pretrained(base, first, adapter_name=adapter_name(0))
        for k, path in enumerate(expert_paths[1:], start=1):
            model.load_adapter(safe_adapter(path), adapter_name=adapter_name(k))
        self.model = model.eval()
        self.n_experts = len(expert_paths)
        self.max_positions = getattr(base.config, "max_position_embeddings", None)
        # The active adapter is the model's state: one generation at a time (a batch, a sampled
        # answer; a stream or an ensemble one step at a time, giving its turn to the requests
        # that wait between two tokens, so that a long answer does not hold up the others).
        self.lock = TurnLock()

    def render(self, prompt: str | Sequence[dict[str, str]]) -> str:
        """The prompt as the experts saw prompts in training (``data.template``). A chat (a list
        of ``{"role", "content"}`` messages) goes through the tokenizer's chat template where the
        model has one, else becomes one instruction (the contents, a blank line apart) in
        ``data.template``."""
        if not isinstance(prompt, str):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            prompt = chat_instruction(messages)
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
        check_fits(self._n_tokens(self.render(prompt)), max_new_tokens, self.max_positions)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @_locked
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        experts: Sequence[int],
        max_new_tokens: int | Sequence[int] = 64,
    ) -> list[Generation]:
        """Greedy answers, row i from ``experts[i]``; ``max_new_tokens`` per row or for all.

        The batch is split by ``plan_batches`` into sub-batches that fit the model; each runs as
        one ``generate`` call for its longest request (greedy decoding makes a shorter request's
        answer a prefix of the longer run, so each row is cut to its own limit). Raises
        ``ServingError`` if a row cannot be served even alone."""
        n = len(prompts)
        if len(experts) != n:
            raise ServingError(f"{n} prompts but {len(experts)} experts")
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ServingError(f"{n} prompts but {len(limits)} max_new_tokens values")
        for k, m in zip(experts, limits, strict=True):
            self.check(k, m)
        texts = [self.render(p) for p in prompts]
        lens = [self._n_tokens(t) for t in texts]
        results: list[Generation | None] = [None] * n
        for group in plan_batches(lens, limits, self.max_positions):
            gens = self._generate_group(
                [texts[i] for i in group],
                [int(experts[i]) for i in group],
                [limits[i] for i in group],
            )
            for i, g in zip(group, gens, strict=True):
                results[i] = g
        return results  # type: ignore[return-value]  # every row is in exactly one group

    def sample(
        self,
        prompt: str,
        expert: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Generation:
        """One sampled answer (``temperature`` > 0, nucleus ``top_p``); the same ``seed`` gives
        the same answer (its random state is the request's own and the global one is left as
        it was, so one client's seed never decides the next client's draws). It runs as a
        stream read to its end, so that a long answer gives the pool's turn to the requests
        that wait between two of its tokens."""
        *_, done = self.stream(prompt, expert, max_new_tokens, sampling=(temperature, top_p, seed))
        return done

    def ensemble(self, prompt: str, weights: Sequence[float], max_new_tokens: int) -> Generation:
        """The ensemble of all K experts: greedy over the mixture ``sum_k w_k softmax(logits_k)``
        of the experts with weight, until EOS or ``max_new_tokens`` (``core.generate.
        mixture_steps``, as ``gs-ray eval`` scores it: one KV cache per expert, so a step costs
        one one-token forward per expert with weight)."""
        ids = self._ensemble_ids(prompt, weights, max_new_tokens)
        new = list(self._ensemble_tokens(ids, weights, max_new_tokens))
        return self._finish(MIXTURE, new, ids.shape[1], max_new_tokens)

    def _ensemble_ids(
        self, prompt: str | Sequence[dict[str, str]], weights: Sequence[float], max_new_tokens: int
    ) -> torch.Tensor:
        if len(weights) != self.n_experts:
            raise ServingError(f"weights: {len(weights)} values for {self.n_experts} experts")
        self.check(0, max_new_tokens)
        text = self.render(prompt)
        ids = self.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
        check_fits(ids.shape[1], max_new_tokens, self.max_positions)
        return ids.to(self.device)

    def _ensemble_tokens(
        self, ids: torch.Tensor, weights: Sequence[float], max_new_tokens: int
    ) -> Iterator[int]:
        """The ensemble's tokens one by one (EOS included when it comes). Takes the lock for
        each step (every expert's forward sets its own adapter, each with its own KV cache), so
        the requests that wait run between two tokens; do not hold it."""
        from gs_ray.core.generate import mixture_steps

        eos = self.tokenizer.eos_token_id
        names = [adapter_name(k) for k in range(self.n_experts)]
        steps = mixture_steps(
            self.model,
            names,
            np.asarray([weights], dtype=np.float64),
            [ids[0].tolist()],
            max_new_tokens,
            self.pad_id,
            self.device,
        )
        try:
            while True:
                with self.lock:
                    step = next(steps, None)
                if step is None:
                    return
                (token,) = step
                yield token
                if token == eos:
                    return
        finally:
            with self.lock:
                steps.close()

    def stream(
        self,
        prompt: str | Sequence[dict[str, str]],
        expert: int,
        max_new_tokens: int,
        sampling: tuple[float, float, int | None] | None = None,
        weights: Sequence[float] | None = None,
    ) -> Iterator[str | Generation]:
        """One answer as it is generated: text pieces (``str``) as tokens come, then the
        ``Generation`` (the whole text, token counts, finish reason). Greedy by default (the
        answer ``generate`` gives, piece by piece), ``sampling`` = (temperature, top_p, seed) as
        ``sample``, or ``weights`` for the ensemble of all experts as ``ensemble``. A request
        that cannot be served raises ``ServingError`` before anything is yielded. The generation
        takes the pool's lock a step at a time: the requests that wait run between two of its
        tokens. Consume the iterator in one thread (not holding the lock); closing it early
        stops the generation."""
        if weights is not None:
            ids = self._ensemble_ids(prompt, weights, max_new_tokens)
            n_prompt, expert = ids.shape[1], MIXTURE
        else:
            self.validate(prompt, expert, max_new_tokens)
            text = self.render(prompt)
            ids = self.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
            n_prompt = ids.shape[1]
        eos = self.tokenizer.eos_token_id
        deltas = TextDeltas(self.tokenizer)
        new: list[int] = []
        stop = False
        tokens = self._stream_tokens(ids, expert, max_new_tokens, sampling, weights)
        try:
            for token in tokens:
                if eos is not None and token == eos:
                    stop = True
                    break
                if len(new) == max_new_tokens:
                    break
                new.append(token)
                piece = deltas.add(token)
                if piece:
                    yield piece
        finally:  # a consumer that stops early stops the generation (at its next token)
            tokens.close()
        rest = deltas.finish()
        if rest:
            yield rest
        yield Generation(expert, deltas.sent, n_prompt, len(new), "stop" if stop else "length")

    def _stream_tokens(self, ids, expert, max_new_tokens, sampling, weights) -> Iterator[int]:
        """New token ids of one generation as they come (``generate`` runs in a thread and
        hands them over through a ``_TokenQueue``). That thread holds the pool's lock, and
        gives its turn to the requests that wait after each token (the stopping criterion runs
        between two steps): it then takes the lock back, its adapter and its random state
        again (``_OwnRng``), and goes on with its own KV cache. Do not hold the lock."""
        if weights is not None:
            yield from self._ensemble_tokens(ids.to(self.device), weights, max_new_tokens)
            return
        from transformers import StoppingCriteria

        pool, seed = self, None
        if sampling is None:
            how: dict = {"do_sample": False}
        else:
            temperature, top_p, seed = sampling
            how = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        streamer = _TokenQueue()
        failure: list[BaseException] = []
        halt = threading.Event()  # set when the consumer stops early (a client that went away)

        rng = _OwnRng(seed, self.device)

        class _Turns(StoppingCriteria):
            """After each token: stop if the consumer went away, else give the turn to the
            requests that wait."""

            def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
                if not halt.is_set() and pool.lock.waiting():
                    rng.swap()  # the outside state in while the others run, ours out
                    pool.lock.give_turn()
                    rng.swap()
                    pool.model.set_adapter(adapter_name(expert))
                return torch.full(
                    (input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device
                )

        def run() -> None:
            try:
                with self.lock, torch.no_grad():
                    self.model.set_adapter(adapter_name(expert))
                    rng.enter()
                    try:
                        self._generate_stream(ids, max_new_tokens, streamer, _Turns(), how)
                    finally:
                        rng.leave()
            except BaseException as e:  # handed to the consumer, raised there
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, name="gs-ray-stream", daemon=True)
        worker.start()
        try:
            while (token := streamer.queue.get()) is not None:
                yield token
        finally:
            halt.set()  # a consumer that stops early stops generate at its next token
            worker.join()
        if failure:
            raise failure[0]

    def _generate_stream(self, ids, max_new_tokens, streamer, turns, how) -> None:
        from transformers import StoppingCriteriaList

        self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids).to(self.device),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([turns]),
            **how,
        )

    def _finish(self, expert: int, new: list[int], n_prompt: int, limit: int) -> Generation:
        new = new[:limit]
        eos = self.tokenizer.eos_token_id
        stop = eos is not None and eos in new
        if stop:
            new = new[: new.index(eos)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(expert, text, n_prompt, len(new), "stop" if stop else "length")

    def _generate_group(
        self, texts: list[str], experts: list[int], limits: list[int]
    ) -> list[Generation]:
        """One ``generate`` call over rendered prompts that fit the model together."""
        batch = self.tokenizer(texts, add_special_tokens=True, padding=True, return_tensors="pt")
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        longest = max(limits)
        width = batch["input_ids"].shape[1]
        check_fits(
            width, longest, self.max_positions
        )  # every row runs `longest` steps from column `width`
        eos = self.tokenizer.eos_token_id
        if len(set(experts)) == 1:  # one expert: the plain forward of the active adapter
            self.model.set_adapter(adapter_name(experts[0]))
            per_row = {}
        else:  # peft splits each LoRA layer's batch by adapter
            per_row = {"adapter_names": [adapter_name(k) for k in experts]}
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
        for i in range(len(texts)):
            new = out[i, width:].tolist()[: limits[i]]
            stop = eos is not None and eos in new
            if stop:
                new = new[: new.index(eos)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(
                Generation(
                    experts[i],
                    text,
                    int(prompt_lens[i]),
                    len(new),
                    "stop" if stop else "length",
                )
            )
        return results


class ServedRun:
    """A finished run directory seen from the serving side: config, base model, experts, router."""

    def __init__(self, run: RunDir, cfg: Config, n_experts: int):
        self.run, self.cfg, self.n_experts = run, cfg, n_experts
        # The generalist fallback is served as one more adapter, index K, where the run has one.
        self.has_generalist = (
            cfg.fallback.enabled and run.generalist_complete() and run.fallback_json.exists()
        )

    @property
    def generalist_index(self) -> int | None:
        """The pool index of the generalist adapter (K), or None where the run has none."""
        return self.n_experts if self.has_generalist else None

    def fallback(self):
        """The calibrated fallback rule (``routing.fallback.Fallback``), or None."""
        from gs_ray.routing.fallback import Fallback

        return Fallback.load(self.run.fallback_json) if self.has_generalist else None

    @classmethod
    def open(cls, path: str | Path) -> ServedRun:
        """Check that ``path`` holds a router and all its experts; the error names what is
        missing and how to complete it."""
        run = RunDir.open(path)  # RunDirError: missing, or not a run directory
        cfg = run.config()
        router_json = run.router / ROUTER_JSON
        resume = f"complete it with `gs-ray run --resume {run.path}`"
        if not router_json.exists():
            raise ServingError(f"{router_json} is missing: the run has no router yet; {resume}")
        import json

        k = int(json.loads(router_json.read_text())["n_clusters"])
        for c in range(k):
            if not run.expert_complete(c):
                raise ServingError(
                    f"{run.expert(c)} is missing or incomplete (the router has {k} experts); "
                    f"{resume}"
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
        """The pool's adapters: the K experts, then the generalist where there is one."""
        paths = [str(self.run.expert(c)) for c in range(self.n_experts)]
        return paths + ([str(self.run.generalist)] if self.has_generalist else [])

    def router(self, device: str | None = None):
        from gs_ray.routing.router import load_router

        return load_router(self.run.router, device=device)

    def expert_pool(self, device: str | torch.device | None = None) -> ExpertPool:
        return ExpertPool(self.base_path(), self.cfg, self.expert_paths(), device)

    def info(self) -> dict:
        """What a client may want to know: the run, K, the base model, per-expert cluster facts."""
        manifest = self.run.manifest()
        metrics = self.run.metrics()
        sizes: dict[int, dict[str, int]] = {}
        mapping = None
        if self.cfg.clustering.routability != "off" and self.run.routability_json.exists():
            import json

            mapping = json.loads(self.run.routability_json.read_text())["mapping"]
        if self.run.assignments_path.exists():
            for row in self.run.assignments():
                if row["cluster"] is None:
                    continue
                c = int(row["cluster"]) if mapping is None else int(mapping[int(row["cluster"])])
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
                }
                for c in range(self.n_experts)
            ],
            "generalist": self.generalist_index,
            "fallback": metrics.get("fallback"),
            "router_holdout_accuracy": metrics.get("router", {}).get("holdout_accuracy"),
            "created": manifest.get("created"),
        }
