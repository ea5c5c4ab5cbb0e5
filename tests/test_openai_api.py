"""The OpenAI-compatible API's pure parts, no Serve: the ensemble's step on a hand-computed case,
stop sequences (whole and streamed), streamed text pieces, the error shape, and the API key
(401). The routes themselves are tested over HTTP with the official openai client in
test_serving.py (one deployment for all, plus an ingress with an API key on the same replicas)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gs_ray.config import ServeConfig
from gs_ray.serving.app import (
    ChatRequest,
    CompletionRequest,
    Ingress,
    OpenAIError,
    StopCutter,
    chat_prompt,
    cut_at_stop,
    expert_model,
    openai_validation_error,
)
from gs_ray.serving.pool import TextDeltas, ensemble_next_token


def test_ensemble_step_by_hand():
    """Two experts, three tokens. Expert 0 prefers token 0 strongly, expert 1 token 2 mildly:
    p0 = softmax([2, 0, 0]) = [0.787, 0.107, 0.107], p1 = softmax([0, 0, 0.5]) =
    [0.274, 0.274, 0.452]. With weights (0.3, 0.7): mixture [0.428, 0.224, 0.348] -> token 0;
    with (0.1, 0.9): [0.326, 0.257, 0.418] -> token 2. An average of logits would differ:
    0.3*[2,0,0] + 0.7*[0,0,.5] = [0.6, 0, 0.35] -> 0 as well, but (0.2, 0.8) separates them."""
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])
    e = [math.exp(2), 1, 1]
    p0 = [x / sum(e) for x in e]
    f = [1, 1, math.exp(0.5)]
    p1 = [x / sum(f) for x in f]
    for w0 in (0.3, 0.1, 0.2, 0.25):
        mix = [w0 * x + (1 - w0) * y for x, y in zip(p0, p1, strict=True)]
        assert ensemble_next_token([a, b], [w0, 1 - w0]) == mix.index(max(mix)), w0
    assert ensemble_next_token([a, b], [0.3, 0.7]) == 0
    assert ensemble_next_token([a, b], [0.1, 0.9]) == 2
    # probabilities, not logits: at (0.2, 0.8) mixed logits [0.4, 0, 0.4] tie, the mixture not
    assert ensemble_next_token([a, b], [0.2, 0.8]) == 2  # [0.377, 0.241, 0.383]


def test_cut_at_stop_and_chat_prompt():
    assert cut_at_stop("abc.def\nx", ["\n", "."]) == ("abc", True)
    assert cut_at_stop("abc", "z") == ("abc", False)
    assert cut_at_stop("abc", None) == ("abc", False)
    assert cut_at_stop("abc", ["", "c"]) == ("ab", True)
    from gs_ray.serving.app import ChatMessage

    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert chat_prompt(msgs) == "Be brief.\n\nHi"
    assert expert_model(2) == "gs-ray/expert-2"


def test_openai_error_shape():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json('{"model": "gs-ray", "prompt": "hi", "seed": "1"}')
    err = openai_validation_error(e.value.errors())
    body = json.loads(err.response().body)
    assert err.status == 400 and body["error"]["param"] == "seed"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json('{"model": "gs-ray", "prompt": ["a", "b"]}')
    assert openai_validation_error(e.value.errors()).param == "prompt"


def test_api_key_gives_401_without_it(monkeypatch):
    """The key is resolved where the app is built (the driver), from serve.api_key or the
    shell's GS_RAY_API_KEY; the Ingress holds its digest and checks every route but health."""
    from gs_ray.serving.app import api_key_digest

    ingress = next(c for c in Ingress.func_or_class.__mro__ if "_auth" in vars(c))
    shell = object.__new__(ingress)

    def req(header=None):
        return SimpleNamespace(headers={} if header is None else {"authorization": header})

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    shell.key_sha256 = api_key_digest(ServeConfig())
    assert shell.key_sha256 is None
    shell._auth(req())  # no key set: open (loopback only, below)
    for cfg, env in ((ServeConfig(api_key="s3cret"), None), (ServeConfig(), "s3cret")):
        if env:
            monkeypatch.setenv("GS_RAY_API_KEY", env)
        shell.key_sha256 = api_key_digest(cfg)
        monkeypatch.delenv("GS_RAY_API_KEY", raising=False)  # the replica's env does not matter
        assert shell.key_sha256 and "s3cret" not in shell.key_sha256
        for bad in (None, "s3cret", "Bearer nope", "Basic s3cret", "Bearer ", "Bearer \ud800"):
            with pytest.raises(OpenAIError) as e:
                shell._auth(req(bad))
            assert e.value.status == 401 and e.value.type == "authentication_error"
        shell._auth(req("Bearer s3cret"))
    # every route but health calls _auth first
    shell.key_sha256 = api_key_digest(ServeConfig(api_key="k"))
    shell.info_ = {"n_experts": 3}
    with pytest.raises(OpenAIError):
        asyncio.run(ingress.models(shell, req()))
    with pytest.raises(OpenAIError):
        asyncio.run(ingress.info(shell, req()))
    assert asyncio.run(ingress.healthz(shell)) == "ok"


def test_a_public_host_without_a_key_is_refused(monkeypatch):
    from gs_ray.serving.app import api_key_digest
    from gs_ray.serving.pool import ServingError

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    with pytest.raises(ServingError, match="0.0.0.0.*no API key.*allow_no_key"):
        api_key_digest(ServeConfig(host="0.0.0.0"))
    assert api_key_digest(ServeConfig(host="0.0.0.0", allow_no_key=True)) is None
    monkeypatch.setenv("GS_RAY_API_KEY", "k")
    assert api_key_digest(ServeConfig(host="0.0.0.0")) is not None
    for host in ("127.0.0.1", "localhost", "::1"):
        monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
        assert api_key_digest(ServeConfig(host=host)) is None


@pytest.mark.parametrize(
    ("field", "body", "message"),
    [
        ("seed", {"seed": 2**64}, "less than 9223372036854775808"),
        ("seed", {"seed": -1}, "greater than or equal to 0"),
        ("temperature", {"temperature": 1e-300}, "must be 0 (greedy) or at least 0.01"),
        ("stop", {"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ("stop", {"stop": "x" * 257}, "at most 256 characters"),
    ],
)
def test_request_fields_are_bounded(field, body, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "gs-ray", "prompt": "hi", **body})
    err = openai_validation_error(e.value.errors())
    assert err.status == 400 and err.param == field and message in err.message, err.message
    chat = {"model": "gs-ray", "messages": [{"role": "user", "content": "a"}] * 257}
    with pytest.raises(ValidationError, match="at most 256 items"):
        ChatRequest.model_validate(chat)
    CompletionRequest.model_validate({"model": "gs-ray", "prompt": "hi", "seed": 2**63 - 1,
                                      "temperature": 0})  # fmt: skip


def test_one_failing_row_never_fails_its_batch():
    """A row whose generation raises (not a ServingError: e.g. the sampler's inf / nan, or a
    chat template that raises) gets its own error; the other rows of the batch are served."""
    from gs_ray.serving.app import ExpertsDeployment
    from gs_ray.serving.pool import Generation, ServingError

    class Pool:
        def validate(self, prompt, expert, m):
            if prompt == "template raises":
                raise TypeError("bad template")
            if prompt == "too long":
                raise ServingError("prompt: 9 tokens exceed the context")

        def generate(self, prompts, experts, ms):
            if "boom" in prompts:
                raise RuntimeError("probability tensor contains inf")
            return [Generation(e, p.upper(), 1, 1, "length") for p, e in zip(prompts, experts)]

        def sample(self, prompt, expert, m, *mode):
            raise RuntimeError("probability tensor contains nan")

        def ensemble(self, prompt, weights, m):
            return Generation(-1, "mix", 1, 1, "length")

    cls = next(c for c in ExpertsDeployment.func_or_class.__mro__ if "_greedy" in vars(c))
    shell = object.__new__(cls)
    shell.pool, shell.n_batches, shell.n_requests = Pool(), 0, 0
    shell.batch_sizes = collections.deque(maxlen=8)
    rows = [("ok", 0, 2), ("boom", 1, 2), ("template raises", 0, 2), ("too long", 0, 2),
            ("sampled", 0, 2, ("sample", 0.5, 1.0, 3)), ("mixed", -1, 2, ("ensemble", [1.0])),
            ("fine", 1, 2)]  # fmt: skip
    generate = cls.generate
    out = asyncio.run(getattr(generate, "__wrapped__", generate)(shell, rows))
    assert out[0]["text"] == "OK" and out[6]["text"] == "FINE" and out[5]["text"] == "mix"
    assert out[1] == {"error": "generation failed (RuntimeError)", "server_error": True}
    assert out[4] == {"error": "generation failed (RuntimeError)", "server_error": True}
    assert "could not be prepared (TypeError: bad template)" in out[2]["error"]
    assert out[3] == {"error": "prompt: 9 tokens exceed the context"}
    assert Ingress.func_or_class._generation_error(out[1]).status == 500
    assert Ingress.func_or_class._generation_error(out[3]).code == "context_length_exceeded"


def test_stop_cutter_joins_to_cut_at_stop():
    """Streamed text cut at stop strings, in random pieces, joins to the whole text's cut; no
    piece is sent that a later stop string would have removed."""
    import random

    rng = random.Random(0)
    words = ["ab", "c", ".", "\n", "END", "E", "N", "D", "x y", "stop"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
        stop = rng.choice([None, "END", ["\n", "."], ["ND", "stop"], "", ["c."]])
        cutter = StopCutter(stop)
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        sent = "".join(cutter.feed(x) for x in pieces) + cutter.finish()
        assert (sent, cutter.stopped) == cut_at_stop(text, stop), (text, stop, pieces)


class _CharTokenizer:
    """Token i is a byte; decoding replaces a cut UTF-8 character with U+FFFD, as BPE
    tokenizers do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def test_text_deltas_join_to_the_decoded_text():
    tok = _CharTokenizer()
    ids = list("héllo → wörld ✓".encode()) + [300]  # 300: a special token, skipped
    deltas = TextDeltas(tok)
    pieces = [deltas.add(i) for i in ids] + [deltas.finish()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 5  # text goes out as it comes


def test_route_says_which_adapter_and_why_with_the_generalist_fallback():
    """The router deployment's decision: the router's expert above the calibrated threshold, the
    generalist (index K, model gs-ray/generalist) below it, each with its reason; the generalist
    is listed and can be asked for by name."""
    from gs_ray.routing.fallback import Fallback
    from gs_ray.serving.app import GENERALIST_MODEL, Ingress, RouterDeployment, expert_model

    deployment = RouterDeployment.func_or_class
    shell = object.__new__(deployment)
    shell.fallback, shell.generalist = Fallback(1.0, "threshold", 0.6), 3
    sure = shell._decide(np.array([0.1, 0.8, 0.1]))
    assert sure["expert"] == 1 and not sure["fallback"] and sure["adapter"] == expert_model(1)
    assert "at or above" in sure["reason"] and sure["confidence"] == pytest.approx(0.8)
    unsure = shell._decide(np.array([0.4, 0.35, 0.25]))
    assert unsure["expert"] == 3 and unsure["fallback"] and unsure["adapter"] == GENERALIST_MODEL
    assert unsure["router_expert"] == 0 and "below" in unsure["reason"]
    shell.fallback, shell.generalist = None, None
    plain = shell._decide(np.array([0.4, 0.35, 0.25]))
    assert plain["expert"] == 0 and not plain["fallback"] and "no generalist" in plain["reason"]

    ingress = next(c for c in Ingress.func_or_class.__mro__ if "_models" in vars(c))
    shell = object.__new__(ingress)
    shell.info_ = {"n_experts": 3, "generalist": 3}
    assert GENERALIST_MODEL in shell._models()
    shell.info_ = {"n_experts": 3, "generalist": None}
    assert GENERALIST_MODEL not in shell._models()
