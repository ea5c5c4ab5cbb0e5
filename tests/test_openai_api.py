"""The OpenAI-compatible API's pure parts, no Serve: the ensemble's step on a hand-computed case,
stop sequences (whole and streamed), streamed text pieces, the error shape, and the API key
(401). The routes themselves are tested over HTTP with the official openai client in
test_serving.py (one deployment for all, plus an ingress with an API key on the same replicas)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.responses import JSONResponse

from gs_ray.config import ServeConfig
from gs_ray.core.generate import mixture_steps
from gs_ray.serving.app import ExpertsDeployment, Ingress
from gs_ray.serving.gate import Clients, Gate, GateMiddleware, install_gate
from gs_ray.serving.pool import ENSEMBLE_MODEL, MODEL, TextDeltas, expert_model
from gs_ray.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    StopCutter,
    chat_prompt,
    cut_at_stop,
    openai_validation_error,
)


class _FixedLogits:
    """A stand-in model with two adapters whose next-token logits never change."""

    def __init__(self, logits: dict[str, torch.Tensor]):
        self.logits, self.active = logits, None

    def set_adapter(self, name: str) -> None:
        self.active = name

    def __call__(self, input_ids, **kwargs):
        n = input_ids.shape[0]
        out = self.logits[self.active].expand(n, input_ids.shape[1], -1)
        return SimpleNamespace(logits=out, past_key_values=("cache", self.active))


def _mixture_token(a, b, weights) -> int:
    model = _FixedLogits({"a": a[None, None], "b": b[None, None]})
    (token,) = next(mixture_steps(model, ["a", "b"], [weights], [[1, 2]], 1, 0, "cpu"))
    return token


def test_ensemble_step_by_hand():
    """The served ensemble's step (core.generate.mixture_steps). Two experts, three tokens.
    Expert 0 prefers token 0 strongly, expert 1 token 2 mildly:
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
        assert _mixture_token(a, b, [w0, 1 - w0]) == mix.index(max(mix)), w0
    assert _mixture_token(a, b, [0.3, 0.7]) == 0
    assert _mixture_token(a, b, [0.1, 0.9]) == 2
    # probabilities, not logits: at (0.2, 0.8) mixed logits [0.4, 0, 0.4] tie, the mixture not
    assert _mixture_token(a, b, [0.2, 0.8]) == 2  # [0.377, 0.241, 0.383]
    assert _mixture_token(a, b, [1.0, 0.0]) == 0  # an expert with no weight is not consulted


def test_cut_at_stop_and_chat_prompt():
    assert cut_at_stop("abc.def\nx", ["\n", "."]) == ("abc", True)
    assert cut_at_stop("abc", "z") == ("abc", False)
    assert cut_at_stop("abc", None) == ("abc", False)
    assert cut_at_stop("abc", ["", "c"]) == ("ab", True)
    from gs_ray.serving.protocol import ChatMessage

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


def _through_gate(
    gate, path="/v1/completions", headers=None, chunks=(b"{}",), method="POST", peer=None
):
    """One request through ``GateMiddleware`` (with ``gate`` installed) in front of an app that
    echoes what it read: (status, JSON body, what the app read or None, receive() calls).
    ``peer``: the client's address in the ASGI scope."""
    from gs_ray.serving import gate as gate_module

    seen: dict = {}
    calls = {"receive": 0}
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        calls["receive"] += 1
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def downstream(scope, receive, send):
        body = b""
        if method == "POST":
            message = await receive()
            body = message["body"]
        seen["body"] = body
        await JSONResponse({"read": len(body)})(scope, receive, send)

    sent: list = []

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": raw,
        "query_string": b"",
    }
    if peer is not None:
        scope["client"] = (peer, 50000)
    if gate is None:
        gate_module._GATE.clear()
    else:
        install_gate(gate)
    asyncio.run(GateMiddleware(downstream)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    return status, body, seen.get("body"), calls["receive"]


def test_api_key_is_checked_before_the_body_is_read(monkeypatch):
    """The key is resolved where the app is built (the driver), from serve.api_key or the
    shell's GS_RAY_API_KEY; the gate in front of every route but /healthz (the docs too)
    refuses a request without it before anything reads its body."""
    from gs_ray.serving.gate import client_keys

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    assert client_keys(ServeConfig()).keys == {}
    host = {"host": "127.0.0.1:8000"}
    open_gate = Gate.for_serving(ServeConfig(), None)
    assert _through_gate(open_gate, headers=host)[0] == 200  # no key: open (loopback only)
    for cfg, env in ((ServeConfig(api_key="s3cret"), None), (ServeConfig(), "s3cret")):
        if env:
            monkeypatch.setenv("GS_RAY_API_KEY", env)
        keys = client_keys(cfg)
        monkeypatch.delenv("GS_RAY_API_KEY", raising=False)  # the replica's env does not matter
        assert list(keys.keys.values()) == ["default"] and "s3cret" not in str(keys)
        gate = Gate.for_serving(cfg, keys)
        for bad in (None, "s3cret", "Bearer nope", "Basic s3cret", "Bearer ", "Bearer \xe9"):
            for path, method in (
                ("/v1/completions", "POST"),
                ("/docs", "GET"),
                ("/openapi.json", "GET"),
                ("/info", "GET"),
            ):
                headers = {} if bad is None else {"authorization": bad}
                status, body, read, receives = _through_gate(gate, path, headers, method=method)
                assert status == 401 and body["error"]["type"] == "authentication_error"
                assert read is None and receives == 0, (bad, path)  # the body was never read
        status, body, read, _ = _through_gate(
            gate, headers={"authorization": "Bearer s3cret"}, chunks=(b'{"a":', b" 1}")
        )
        assert status == 200 and read == b'{"a": 1}'  # the app gets the whole body, once
        assert _through_gate(gate, "/healthz", method="GET")[0] == 200
    assert _through_gate(None, headers=host)[0] == 503  # no gate installed: nothing served


def test_the_body_size_is_bounded_before_parsing():
    gate = Gate({}, 1024, False)
    status, body, read, receives = _through_gate(gate, headers={"content-length": "4096"})
    assert status == 413 and body["error"]["code"] == "request_too_large" and receives == 0
    assert _through_gate(gate, headers={"content-length": "x"})[0] == 413
    # a chunked body (no length) is counted as it comes and cut off at the limit
    chunks = tuple([b"x" * 600] * 50)
    status, _, read, receives = _through_gate(gate, chunks=chunks)
    assert status == 413 and read is None and receives == 2
    status, _, read, _ = _through_gate(gate, chunks=(b"x" * 600, b"y" * 400))
    assert status == 200 and read == b"x" * 600 + b"y" * 400


def test_without_a_key_only_loopback_host_names_are_answered():
    """No key on a loopback host: a Host header that names anything else is refused (a web
    page that rebinds its own name to 127.0.0.1 must not reach the models)."""
    gate = Gate.for_serving(ServeConfig(), None)
    for ok in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000"):
        assert _through_gate(gate, headers={"host": ok})[0] == 200, ok
    for bad in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "", "[::2]:80"):
        status, body, read, _ = _through_gate(gate, headers={"host": bad} if bad else {})
        assert status == 400 and body["error"]["code"] == "invalid_host" and read is None, bad
    assert _through_gate(gate, "/healthz", headers={"host": "x"}, method="GET")[0] == 200
    # a key, or a public host opened on purpose: the Host is not what protects the server
    keyed = Gate.for_serving(ServeConfig(), Clients({"0" * 64: "someone"}))
    assert _through_gate(keyed, headers={"host": "gpu-box.example"})[0] == 401
    public = Gate.for_serving(ServeConfig(host="0.0.0.0", allow_no_key=True), None)
    assert _through_gate(public, headers={"host": "gpu-box.example"})[0] == 200


def test_a_public_host_without_a_key_is_refused(monkeypatch):
    from gs_ray.serving.gate import client_keys
    from gs_ray.serving.pool import ServingError

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    with pytest.raises(ServingError, match="0.0.0.0.*no API key.*allow_no_key"):
        client_keys(ServeConfig(host="0.0.0.0"))
    assert client_keys(ServeConfig(host="0.0.0.0", allow_no_key=True)).keys == {}
    monkeypatch.setenv("GS_RAY_API_KEY", "k")
    assert client_keys(ServeConfig(host="0.0.0.0")).keys != {}
    for host in ("127.0.0.1", "localhost", "::1"):
        monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
        assert client_keys(ServeConfig(host=host)).keys == {}


def _keys_file(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_api_keys_file_names_each_client_and_refuses_what_is_unsafe(tmp_path, monkeypatch):
    """serve.api_keys_file: a client per line (NAME KEY, and a share of its own as options),
    read in the driver; only the keys' digests reach the Ingress, each with its client's name
    (serve.api_key is "default"). A file others may read, a malformed line or option, a short
    or shared key, a name given twice: refused, naming the file and the line."""
    import hashlib

    from gs_ray.serving.gate import Share, client_keys
    from gs_ray.serving.pool import ServingError

    monkeypatch.delenv("GS_RAY_API_KEY", raising=False)
    alice, bob = "a" * 20, "b" * 24
    path = _keys_file(
        tmp_path, f"# clients\n\nalice {alice}\n  bob   {bob}  in_flight=2 rate=0.5\n"
    )
    clients = client_keys(ServeConfig(api_keys_file=path, api_key="the-default-key"))
    assert clients.keys == {
        hashlib.sha256(k.encode()).hexdigest(): name
        for name, k in (("default", "the-default-key"), ("alice", alice), ("bob", bob))
    }
    assert clients.shares == {"bob": Share(max_in_flight=2, rate=0.5)}
    gate = Gate.for_serving(ServeConfig(), clients)
    for key, status in ((alice, 200), (bob, 200), ("the-default-key", 200), ("a" * 19, 401)):
        assert _through_gate(gate, headers={"authorization": f"Bearer {key}"})[0] == status
    # bob's own share, over the serve.client_* default; the others keep the default
    assert gate.limits.share("key bob") == Share(2, 0.5, 8)
    assert gate.limits.share("key alice") == Share(None, None, 8)
    # a public host with a keys file alone is keyed, not refused
    assert len(client_keys(ServeConfig(host="0.0.0.0", api_keys_file=path)).keys) == 2
    bad = {
        f"alice {alice}\n": ("others may read it", 0o644),
        "alice\n": ("line 1: expected NAME KEY [in_flight=N]", 0o600),
        f"alice {alice} fast\n": ("line 1: 'fast' is not one of in_flight=N", 0o600),
        f"alice {alice} rate=-1\n": ("line 1: rate of 'alice' must be given once", 0o600),
        f"alice {alice} in_flight=1.5\n": ("line 1: in_flight of 'alice' must be", 0o600),
        f"alice {alice} burst=2 burst=3\n": ("line 1: burst of 'alice' must be given once", 0o600),
        f"# c\nal/ice {alice}\n": ("line 2: client name 'al/ice'", 0o600),
        "alice short\n": ("line 1: the key of 'alice' has 5 characters", 0o600),
        f"alice {alice}\nalice {bob}\n": ("line 2: client 'alice' is named twice", 0o600),
        f"alice {alice}\nbob {alice}\n": ("line 2: the key of 'bob' is another client's", 0o600),
        "# nothing\n": ("no NAME KEY line", 0o600),
    }
    for text, (message, mode) in bad.items():
        with pytest.raises(ServingError, match=f"serve.api_keys_file .*keys.*{re.escape(message)}"):
            client_keys(ServeConfig(api_keys_file=_keys_file(tmp_path, text, mode)))
    with pytest.raises(ServingError, match="'default' or its key is serve.api_key's"):
        client_keys(
            ServeConfig(api_keys_file=_keys_file(tmp_path, f"default {alice}\n"), api_key="k")
        )
    with pytest.raises(ServingError, match="cannot read it"):
        client_keys(ServeConfig(api_keys_file=str(tmp_path / "absent")))


def test_client_limits_share_a_replica_between_clients():
    """ClientLimits, on a fake clock: a client over its requests in progress or its rate
    gets 429 with Retry-After (OpenAI's rate-limit shape) while another client is served; a
    request that ends gives its slot back; a client's own share overrides the default; idle
    clients are forgotten, so that many addresses cannot grow the table without bound."""
    from gs_ray.serving.gate import ClientLimits, Share

    now = [0.0]
    lim = ClientLimits(Share(max_in_flight=2, burst=1), clock=lambda: now[0])
    assert lim.acquire("a") is None and lim.acquire("a") is None
    refused = lim.acquire("a")
    assert refused.status == 429 and refused.code == "rate_limit_exceeded"
    assert refused.type == "rate_limit_error" and refused.headers == {"Retry-After": "1"}
    assert "serve.client_max_in_flight" in refused.message
    assert lim.acquire("b") is None  # another client is not held back by a
    lim.release("a")
    assert lim.acquire("a") is None

    lim = ClientLimits(Share(rate=2.0, burst=3), clock=lambda: now[0])
    for _ in range(3):  # the burst
        assert lim.acquire("a") is None
        lim.release("a")
    refused = lim.acquire("a")
    assert refused.status == 429 and "serve.client_rate" in refused.message
    assert refused.headers == {"Retry-After": "1"}  # 0.5 s to the next token, rounded up
    assert lim.acquire("b") is None
    now[0] += 0.5  # one token back at 2 per second
    assert lim.acquire("a") is None and lim.acquire("a") is not None

    # a client of its own share: the batch job may run 1 request, at 0.1 per second
    lim = ClientLimits(
        Share(max_in_flight=4, burst=2), {"batch": Share(1, 0.1)}, clock=lambda: now[0]
    )
    assert lim.acquire("batch") is None and lim.acquire("batch") is not None
    lim.release("batch")
    refused = lim.acquire("batch")  # its slot is back, its second token is not (burst 2)
    assert refused is None
    lim.release("batch")
    refused = lim.acquire("batch")
    assert refused.headers == {"Retry-After": "10"}
    assert all(lim.acquire("web") is None for _ in range(4))  # the default: 4 at once

    lim = ClientLimits(Share(1, 1.0, 1), clock=lambda: now[0], max_clients=3)
    for c in ("x", "y", "z"):
        assert lim.acquire(c) is None
    assert lim.acquire("w").message == "too many clients at once; retry later"  # all busy
    lim.release("x")
    now[0] += 1.0  # x is idle and its bucket full again: forgotten, w takes its place
    assert lim.acquire("w") is None and "x" not in lim.buckets


def test_the_gate_takes_a_clients_share_before_the_body_and_gives_it_back():
    """Through GateMiddleware: the share is taken by the key's client (else the address)
    before anything reads the body, and given back when the request ends."""
    import hashlib

    from gs_ray.serving.gate import ClientLimits, Share

    alice = hashlib.sha256(b"alice-key").hexdigest()
    gate = Gate({alice: "alice"}, 1024, False, ClientLimits(Share(max_in_flight=1, burst=1)))
    gate.limits.in_flight["key alice"] = 1  # alice has a request in progress
    status, _, _, _ = _through_gate(gate, headers={"authorization": "Bearer x"})
    assert status == 401 and gate.limits.in_flight == {"key alice": 1}  # no share taken
    status, body, read, receives = _through_gate(
        gate, headers={"authorization": "Bearer alice-key"}
    )
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert read is None and receives == 0  # refused before the body was read
    gate.limits.release("key alice")
    status, _, read, _ = _through_gate(gate, headers={"authorization": "Bearer alice-key"})
    assert status == 200 and gate.limits.in_flight == {}  # served, and its slot given back
    keyless = Gate({}, 1024, False, ClientLimits(Share(max_in_flight=1, burst=1)))
    keyless.limits.in_flight["address 10.0.0.9"] = 1
    assert _through_gate(keyless, peer="10.0.0.9")[0] == 429
    assert _through_gate(keyless, peer="10.0.0.7")[0] == 200  # another address
    assert _through_gate(keyless, "/healthz", method="GET", peer="10.0.0.9")[0] == 200


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
    CompletionRequest.model_validate(
        {"model": "gs-ray", "prompt": "hi", "seed": 2**63 - 1, "temperature": 0}
    )


def test_one_failing_row_never_fails_its_batch():
    """A row whose generation raises (not a ServingError: e.g. the sampler's inf / nan, or a
    chat template that raises) gets its own error; the other rows of the batch are served."""
    from gs_ray.serving.app import ExpertsDeployment
    from gs_ray.serving.pool import MIXTURE, Generation, Mixture, Sampling, ServingError

    class Pool:
        def validate(self, prompt, expert, m):
            if prompt == "template raises":
                raise TypeError("bad template")
            if prompt == "too long":
                raise ServingError(
                    "prompt: 9 tokens exceed the context", code="context_length_exceeded"
                )

        def generate(self, prompts, experts, ms):
            if "boom" in prompts:
                raise RuntimeError("probability tensor contains inf")
            return [Generation(e, p.upper(), 1, 1, "length") for p, e in zip(prompts, experts)]

        def sample(self, prompt, expert, m, *mode):
            raise RuntimeError("probability tensor contains nan")

        def ensemble(self, prompt, weights, m):
            return Generation(MIXTURE, "mix", 1, 1, "length")

    cls = next(c for c in ExpertsDeployment.func_or_class.__mro__ if "_greedy" in vars(c))
    shell = object.__new__(cls)
    shell.pool, shell.n_batches, shell.n_requests = Pool(), 0, 0
    shell.batch_sizes = collections.deque(maxlen=8)
    rows = [
        ("ok", 0, 2),
        ("boom", 1, 2),
        ("template raises", 0, 2),
        ("too long", 0, 2),
        ("sampled", 0, 2, Sampling(0.5, 1.0, 3)),
        ("mixed", MIXTURE, 2, Mixture([1.0])),
        ("fine", 1, 2),
    ]
    generate = cls.generate
    out = asyncio.run(getattr(generate, "__wrapped__", generate)(shell, rows))
    assert out[0]["text"] == "OK" and out[6]["text"] == "FINE" and out[5]["text"] == "mix"
    assert out[1] == {"error": "generation failed (RuntimeError)", "server_error": True}
    assert out[4] == {"error": "generation failed (RuntimeError)", "server_error": True}
    assert "could not be prepared (TypeError: bad template)" in out[2]["error"]
    assert out[3] == {
        "error": "prompt: 9 tokens exceed the context",
        "code": "context_length_exceeded",
    }
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
    from gs_ray.serving.app import Ingress, RouterDeployment
    from gs_ray.serving.pool import GENERALIST_MODEL, expert_model

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


def _ingress_shell(cfg: ServeConfig, experts, n_experts: int = 2):
    """An Ingress without Ray: its methods on fake router and experts handles."""
    from gs_ray.serving.app import Ingress

    cls = next(c for c in Ingress.func_or_class.__mro__ if "_plan" in vars(c))
    shell = object.__new__(cls)

    class Router:
        class route:
            @staticmethod
            async def remote(prompt):
                return {"expert": 0, "probs": [1.0] + [0.0] * (n_experts - 1)}

    shell.router, shell.experts, shell.cfg = Router(), experts, cfg
    shell.info_ = {"n_experts": n_experts, "generalist": None}
    shell.ensembles_running = 0
    return shell


class _Pieces:
    """A stand-in for a streamed DeploymentResponseGenerator."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


def _streamed(shell, pieces, model=MODEL, consume=None):
    """The SSE lines of one streamed completion through ``Ingress._stream``."""

    class Experts:
        def options(self, stream):
            return self

        class stream:
            @staticmethod
            def remote(*args):
                return pieces

    shell.experts = Experts()
    req = CompletionRequest(model=model, prompt="hi", stream=True)
    choice = lambda text, finish: {"text": text, "finish_reason": finish}  # noqa: E731

    async def go():
        response = await shell._stream(req, "hi", None, {"id": "x"}, choice)
        lines = []
        async for line in response.body_iterator:
            lines.append(line)
            if consume is not None and len(lines) == consume:
                await response.body_iterator.aclose()  # the client went away
                break
        return lines

    return asyncio.run(go())


def test_a_stream_that_fails_after_its_first_chunk_ends_with_an_error_and_done():
    done = {"done": True, "n_prompt_tokens": 1, "n_new_tokens": 2, "finish_reason": "length"}
    shell = _ingress_shell(ServeConfig(), None)
    ok = _streamed(shell, _Pieces([{"text": "a"}, {"text": "b"}, done]))
    assert ok[-1] == "data: [DONE]\n\n" and '"finish_reason": "length"' in ok[-2]
    for failure in (
        {"error": "generation failed (RuntimeError)", "server_error": True},
        RuntimeError("the experts replica died"),
    ):
        lines = _streamed(shell, _Pieces([{"text": "a"}, failure, {"text": "never"}]))
        error = json.loads(lines[-2].removeprefix("data: "))
        assert lines[-1] == "data: [DONE]\n\n" and error["error"]["type"] == "server_error"
        assert not any("never" in x for x in lines)


def test_a_client_that_goes_away_cancels_its_generation():
    """The Ingress cancels the experts' stream when its client goes away; the experts replica's
    stream stops the pool's generation (closes it) instead of running to max_tokens."""
    shell = _ingress_shell(ServeConfig(), None)
    pieces = _Pieces([{"text": str(i)} for i in range(100)])
    _streamed(shell, pieces, consume=2)
    assert pieces.cancelled and len(pieces.items) > 90

    import threading
    import time

    made, closed = [], threading.Event()

    class Pool:
        def stream(self, prompt, expert, m, **kwargs):
            try:
                for i in range(m):
                    made.append(i)
                    time.sleep(0.002)
                    yield str(i)
            finally:
                closed.set()

    cls = next(c for c in ExpertsDeployment.func_or_class.__mro__ if "stream" in vars(c))
    deployment = object.__new__(cls)
    deployment.pool, deployment.n_requests = Pool(), 0

    async def consume_two():
        gen = cls.stream(deployment, "hi", 0, 10_000, None)
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()
        return got

    assert asyncio.run(consume_two()) == [{"text": "0"}, {"text": "1"}]
    assert closed.wait(5) and len(made) < 100  # stopped, not run to 10,000 tokens


def test_ensemble_requests_have_their_own_limits():
    """An ensemble request (K forwards per token) has its own max_tokens limit and at most
    serve.max_ensemble_requests run at once per replica (429 beyond); a slot is given back when
    its request ends, failed or not."""

    class Experts:
        class generate:
            @staticmethod
            async def remote(row):
                raise RuntimeError("replica died")

    cfg = ServeConfig(max_ensemble_requests=1, ensemble_max_new_tokens=8)
    shell = _ingress_shell(cfg, Experts())
    too_long = CompletionRequest(model=ENSEMBLE_MODEL, prompt="hi", max_tokens=9)
    with pytest.raises(OpenAIError) as e:
        asyncio.run(shell._plan(too_long, "hi"))
    assert e.value.status == 400 and e.value.param == "max_tokens" and "ensemble" in str(e.value)
    routed = CompletionRequest(model=MODEL, prompt="hi", max_tokens=9)
    assert asyncio.run(shell._plan(routed, "hi"))["m"] == 9  # only the ensemble's limit
    ensemble = CompletionRequest(model=ENSEMBLE_MODEL, prompt="hi", max_tokens=4)
    assert shell._take_ensemble_slot(ensemble) and shell.ensembles_running == 1
    with pytest.raises(OpenAIError) as e:
        shell._take_ensemble_slot(ensemble)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert not shell._take_ensemble_slot(routed)  # routed requests take no slot
    shell._give_back(True)
    with pytest.raises(RuntimeError, match="replica died"):
        asyncio.run(shell._complete(ensemble, "hi"))
    assert shell.ensembles_running == 0
    lines = _streamed(shell, _Pieces([{"text": "a"}, RuntimeError("x")]), ENSEMBLE_MODEL)
    assert lines[-1] == "data: [DONE]\n\n" and shell.ensembles_running == 0
