"""The serving API's wire protocol, apart from Ray Serve: the request schemas (gs-ray's own
``/route`` and ``/generate``, OpenAI's completions and chat), their bounds and validation, errors
in OpenAI's shape (``OpenAIError``), stop strings over streamed text and server-sent events.
``app.py``'s Ingress speaks it; ``gate.py`` answers its refusals in it."""

# No `from __future__ import annotations` here: FastAPI must see the request models as classes.
import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from gs_ray.serving.pool import chat_instruction

# --------------------------------------------------------------------------- gs-ray's requests


def check_prompt(prompt: str) -> str:
    """A prompt must hold some non-space text and be valid Unicode (JSON lets a lone UTF-16
    surrogate such as ``"\\ud800"`` through, which no tokenizer or UTF-8 reply can carry)."""
    if not prompt.strip():
        raise ValueError("must contain a non-whitespace character")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"is not valid Unicode (a lone surrogate at character {e.start})"
        ) from None
    return prompt


class RouteRequest(BaseModel):
    # strict: "8" and true are not integers; forbid: a misspelt field is an error, not a default
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(min_length=1, description="the instruction, without any template")

    _check_prompt = field_validator("prompt")(check_prompt)


class GenerateRequest(RouteRequest):
    max_new_tokens: StrictInt | None = Field(
        default=None, ge=1, description="default: serve config"
    )
    expert: StrictInt | None = Field(
        default=None, ge=0, description="force this expert (no routing)"
    )


def validation_error_body(errors: Any) -> dict[str, Any]:
    """The 422 body for pydantic errors: each error's location, message and type, without the
    request's own input (it may be large, or hold a lone surrogate that UTF-8 cannot encode) and
    with any string that UTF-8 cannot encode escaped, so the reply itself never fails."""

    def safe(x: Any) -> Any:
        if isinstance(x, str):
            return x.encode("utf-8", "backslashreplace").decode("utf-8")
        return x if isinstance(x, (int, float, bool)) or x is None else safe(str(x))

    return {
        "detail": [
            {
                "loc": [safe(part) for part in e.get("loc", ())],
                "msg": safe(e.get("msg", "")),
                "type": safe(e.get("type", "")),
            }
            for e in errors
        ]
    }


# --------------------------------------------------------------------------- the OpenAI API

# Bounds of a request's fields (OpenAI's own where it has one: four stop strings).
MIN_TEMPERATURE = 0.01
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )
        self.headers = headers  # e.g. Retry-After of a 429

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = Field(
        default=False, description="one more chunk after the last: no choices, the usage"
    )


class OpenAIRequest(BaseModel):
    # strict types as the rest of the API; unknown OpenAI fields (user, logprobs...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | StrictInt = Field(default=1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_above_the_floor(cls, v: float) -> float:
        # below the floor the sampler's probabilities overflow to inf / nan
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("must be one string (a list of exactly one)")
            v = v[0]
        return check_prompt(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    @field_validator("messages")
    @classmethod
    def _has_text(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        check_prompt("".join(m.content for m in v))
        return v


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The instruction a chat becomes for the router (and for the experts when the model has no
    chat template, ``ExpertPool.render``): the contents in order, a blank line apart."""
    return chat_instruction([{"role": m.role, "content": m.content} for m in messages])


def cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((i for i in (text.find(x) for x in stops if x) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


_UNION_MEMBER = re.compile(r"str|int|float|bool|none|.*\[.*\]")


def openai_validation_error(errors: Any) -> OpenAIError:
    """A pydantic error list as one OpenAI 400: the first error's field and message."""
    body = validation_error_body(errors)["detail"]
    first = body[0] if body else {"loc": [], "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return OpenAIError(400, f"invalid JSON: {first['msg']}", None, "invalid_json")
    # pydantic names the member of a union it tried ("prompt.str"): keep the fields only
    loc = [str(x) for x in first["loc"] if x != "body" and not _UNION_MEMBER.fullmatch(str(x))]
    param = ".".join(loc) or None
    return OpenAIError(400, f"{param}: {first['msg']}", param, first["type"] or None)


class StopCutter:
    """Stop strings over text that arrives in pieces: ``feed`` returns what may be sent now,
    holding back a tail that could still begin a stop string; ``finish`` the rest. The pieces
    join to ``cut_at_stop(whole text, stop)[0]``, and ``stopped`` tells whether one was found."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [x for x in ([stop] if isinstance(stop, str) else list(stop or [])) if x]
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.buffer, self.stopped = "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        text, self.stopped = cut_at_stop(self.buffer, self.stops)
        if self.stopped:
            self.buffer = ""
            return text
        n = len(self.buffer) - self.hold
        if n <= 0:
            return ""
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format, one ``data:`` line per chunk, ending
    ``data: [DONE]``."""

    async def body():
        async for chunk in events:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
