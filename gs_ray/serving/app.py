"""The Ray Serve application: an HTTP ingress, the router, and the experts.

Three deployments, each a thin shell over ``gs_ray.serving.pool`` (STYLE: thin actors)::

    HTTP -> Ingress (FastAPI) --handle--> RouterDeployment   (the run's router: TF-IDF or encoder)
                              --handle--> ExpertsDeployment  (base model + K LoRA adapters)

* ``POST /generate {"prompt": ..., "max_new_tokens"?: n, "expert"?: k}`` routes the prompt (unless
  ``expert`` forces one) and returns the chosen expert, the router's probabilities, the answer and
  timings. ``POST /route {"prompt": ...}`` only routes. ``GET /info`` describes the run and its
  experts; ``GET /healthz`` answers ``ok``.
* The OpenAI API: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``: server-sent
  events, one chunk per piece of text as the expert generates it, ``stream_options.include_usage``
  honoured), ``GET /v1/models`` (``gs-ray`` routed, ``gs-ray/expert-K`` one expert,
  ``gs-ray/ensemble`` all K weighted by the router's probabilities, ``ExpertPool.ensemble``) and
  ``POST /v1/route``; errors in OpenAI's shape (``OpenAIError``). Greedy requests share the
  experts' batches; sampled (``temperature`` > 0, seeded), streamed and ensemble requests
  each run alone, taking the pool a token at a time, so that the requests waiting run between
  two of their tokens (``pool.TurnLock``).
  With ``serve.api_key`` (or ``GS_RAY_API_KEY``) or ``serve.api_keys_file`` (named clients)
  set, every route but ``/healthz`` needs ``Authorization: Bearer KEY`` (401); each client
  (its key's name, else its address) gets a share of the Ingress (``serve.client_*``, or its
  own in the keys file): 429 beyond (``gate.ClientLimits``).
* Both model deployments batch with ``@serve.batch`` (``serve.max_batch_size``,
  ``serve.batch_wait_s``). An experts replica holds all K adapters (MBs each) on one base model
  and answers a batch that mixes experts in one ``generate`` call; replicas scale out with
  ``serve.expert_replicas`` / ``serve.expert_max_replicas`` (Serve autoscaling). Serve's model
  multiplexing (one model per replica slot, requests steered by model id) pays off when models
  are too big to hold together; LoRA experts on a shared base are not, so one pool per replica
  keeps every replica able to answer every request and lets one batch serve several experts.
* Bad requests get HTTP 422 naming the field (pydantic, strict: ``"8"`` or ``true`` is not an
  integer; a prompt must have a non-space character and be valid Unicode), or 400 with the reason
  (an expert out of range, a prompt too long for the model). A request that fits the model alone
  is answered as alone whatever else is in its batch (``serving.plan_batches``), and a bad request
  never fails the others.
* The HTTP proxy binds ``serve.host`` (127.0.0.1 by default; no authentication unless an API key
  is set), and the
  interactive API docs (``/docs``, ``/redoc``, ``/openapi.json``) answer only with
  ``serve.api_docs``.

Start it with ``gs-ray serve RUN_DIR`` (or ``serve run serve/config.yaml``, or
``ray job submit -- python jobs/serve.py --run-dir RUN_DIR``); see ``build_app``.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as classes
# (with string annotations under @serve.ingress, it took the body for a query parameter).
import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from gs_ray.config import Config, ServeConfig, apply_overrides
from gs_ray.serving.gate import Clients, Gate, GateMiddleware, client_keys, install_gate
from gs_ray.serving.loopback import bind_replica_grpc_to_node
from gs_ray.serving.pool import (  # noqa: F401  (the model names: this module's API too)
    APP_NAME,
    CONTEXT_LENGTH_EXCEEDED,
    ENSEMBLE_MODEL,
    GENERALIST_MODEL,
    MIXTURE,
    MODEL,
    Generation,
    Mixture,
    Mode,
    Sampling,
    ServedRun,
    ServingError,
    chat_instruction,
    decide,
    expert_model,
)
from gs_ray.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    OpenAIError,
    OpenAIRequest,
    RouteRequest,
    StopCutter,
    chat_prompt,
    cut_at_stop,
    openai_validation_error,
    sse_response,
    validation_error_body,
)

log = logging.getLogger(__name__)


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


# --------------------------------------------------------------------------- model deployments


@serve.deployment
class RouterDeployment:
    """The router: batched ``predict_proba`` over prompts."""

    def __init__(self, run_dir: str, cfg: ServeConfig):
        bind_replica_grpc_to_node()  # before Ray's _on_initialized binds it
        _set_threads(cfg.router_cpus)
        served = ServedRun.open(run_dir)
        self.router = served.router()
        self.fallback, self.generalist = served.fallback(), served.generalist_index
        if cfg.router_int8:
            self.router.quantize()
        self.router.predict(["warm-up"])  # load the encoder now, not on the first request
        self.route.set_max_batch_size(cfg.max_batch_size)
        self.route.set_batch_wait_timeout_s(cfg.batch_wait_s)

    @serve.batch
    async def route(self, prompts: list[str]) -> list[dict[str, Any]]:
        # In a thread, so the replica's event loop (health checks, queueing) stays responsive.
        probs = await asyncio.to_thread(self.router.predict_proba, prompts)
        return [self._decide(p) for p in probs]

    def _decide(self, p) -> dict[str, Any]:
        return decide(p, self.fallback, self.generalist)


@serve.deployment
class ExpertsDeployment:
    """All K experts on one base model: batched, mixed-expert greedy generation."""

    def __init__(self, run_dir: str, cfg: ServeConfig):
        bind_replica_grpc_to_node()  # before Ray's _on_initialized binds it
        from gs_ray.core.models import resolve_device

        _set_threads(cfg.expert_cpus)
        self.pool = ServedRun.open(run_dir).expert_pool(resolve_device(cfg.device))
        self.generate.set_max_batch_size(cfg.max_batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)  # latest
        self.n_batches = self.n_requests = 0

    def _problem(self, prompt: str, expert: int, max_new_tokens: int) -> dict[str, Any] | None:
        try:
            self.pool.validate(prompt, max(expert, 0), max_new_tokens)
        except ServingError as e:
            return e.row()
        except Exception as e:  # e.g. a chat template that raises: this row only
            return {"error": f"prompt: could not be prepared ({type(e).__name__}: {e})"}
        return None

    @staticmethod
    def _failed(e: Exception) -> dict[str, Any]:
        """One row's unexpected failure, answered to that row alone (Ray Serve's batcher would
        hand a raised exception to every request of the batch)."""
        log.exception("a generation failed")
        return {"error": f"generation failed ({type(e).__name__})", "server_error": True}

    @staticmethod
    def _row(g: Generation, batch_size: int, ms: float) -> dict[str, Any]:
        return {
            "text": g.text,
            "n_prompt_tokens": g.n_prompt_tokens,
            "n_new_tokens": g.n_new_tokens,
            "finish_reason": g.finish_reason,
            "batch_size": batch_size,
            "generate_ms": ms,
        }

    def _greedy(self, rows: list[tuple]) -> list[dict[str, Any]]:
        """Greedy rows as one batch; if the batch fails, each row alone, so that only the rows
        that fail themselves get an error."""
        start = time.perf_counter()
        try:
            gens = self.pool.generate(
                [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
            )
        except Exception:
            if len(rows) == 1:
                raise
            return [self._greedy_one(r) for r in rows]
        ms = 1000 * (time.perf_counter() - start)
        return [self._row(g, len(rows), ms) for g in gens]

    def _greedy_one(self, row: tuple) -> dict[str, Any]:
        try:
            return self._greedy([row])[0]
        except ServingError as e:
            return e.row()
        except Exception as e:
            return self._failed(e)

    def _one(self, prompt: str, expert: int, m: int, mode: Sampling | Mixture) -> dict[str, Any]:
        """A request that does not join the greedy batch: sampled, or the ensemble."""
        start = time.perf_counter()
        try:
            if isinstance(mode, Sampling):
                g = self.pool.sample(prompt, expert, m, mode.temperature, mode.top_p, mode.seed)
            else:
                g = self.pool.ensemble(prompt, mode.weights, m)
        except ServingError as e:
            return e.row()
        except Exception as e:  # e.g. a sampler that overflows: this row only
            return self._failed(e)
        return self._row(g, 1, 1000 * (time.perf_counter() - start))

    @serve.batch
    async def generate(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """Rows ``(prompt, expert, max_new_tokens[, mode])``; ``mode`` None is greedy (batched
        with the other greedy rows), a ``Sampling`` or a ``Mixture`` (the ensemble) runs one at
        a time after the batch."""
        self.batch_sizes.append(len(requests))
        self.n_batches += 1
        self.n_requests += len(requests)
        out: list[dict[str, Any]] = [{} for _ in requests]
        ok, single = [], []
        for i, (prompt, expert, m, *rest) in enumerate(requests):
            problem = self._problem(prompt, expert, m)
            if problem:
                out[i] = problem
            elif rest and rest[0] is not None:
                single.append(i)
            else:
                ok.append(i)
        for i in single:
            prompt, expert, m, mode = requests[i]
            out[i] = await asyncio.to_thread(self._one, prompt, expert, m, mode)
        if ok:
            # One batch at a time (serve.batch's default), in a thread: the event loop stays free.
            rows = [tuple(requests[i][:3]) for i in ok]
            try:
                done = await asyncio.to_thread(self._greedy, rows)
            except Exception as e:  # a batch of one that failed
                done = [self._failed(e)]
            for i, row in zip(ok, done, strict=True):
                out[i] = row
        return out

    async def stream(self, prompt: Any, expert: int, m: int, mode: Mode):
        """One answer as it is generated (``ExpertPool.stream``): ``{"text": piece}`` items,
        then ``{"done": ...}`` (token counts, finish reason), or one ``{"error": message}`` for a
        request that cannot be served. Streams do not join the greedy batches: the pool runs
        one generation at a time, so a stream and a batch take turns."""
        kwargs: dict[str, Any] = {}
        if isinstance(mode, Sampling):
            kwargs["sampling"] = (mode.temperature, mode.top_p, mode.seed)
        elif isinstance(mode, Mixture):
            kwargs["weights"], expert = mode.weights, MIXTURE
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        end = object()
        gone = threading.Event()  # the caller went away (a client that disconnected)

        def run() -> None:  # one thread from first token to last: it holds the pool's lock
            pieces = self.pool.stream(prompt, expert, m, **kwargs)
            try:
                for item in pieces:
                    if gone.is_set():
                        break  # closing the pool's stream stops its generation at once
                    loop.call_soon_threadsafe(items.put_nowait, item)
            except ServingError as e:
                loop.call_soon_threadsafe(items.put_nowait, e)
            except Exception as e:  # this stream only
                log.exception("a streamed generation failed")
                failed = ServingError(f"generation failed ({type(e).__name__})")
                loop.call_soon_threadsafe(items.put_nowait, failed)
            finally:
                pieces.close()
                loop.call_soon_threadsafe(items.put_nowait, end)

        self.n_requests += 1
        worker = loop.run_in_executor(None, run)
        try:
            while (item := await items.get()) is not end:
                if isinstance(item, ServingError):
                    yield item.row()
                elif isinstance(item, Generation):
                    yield {
                        "done": True,
                        "n_prompt_tokens": item.n_prompt_tokens,
                        "n_new_tokens": item.n_new_tokens,
                        "finish_reason": item.finish_reason,
                    }
                else:
                    yield {"text": item}
        finally:  # also when the caller cancels or closes this generator
            gone.set()
            await asyncio.shield(worker)

    def stats(self) -> dict[str, Any]:
        """Batches and requests served so far, and the sizes of the latest 1,024 batches."""
        return {
            "batches": self.n_batches,
            "requests": self.n_requests,
            "batch_sizes": list(self.batch_sizes),
        }


# (Defined before Ingress: serve.ingress captures the class's globals when it is decorated.)
# The docs routes are the Ingress's own, answering only with serve.api_docs (see Ingress.docs).
api = FastAPI(
    title="gs-ray",
    description="GradientSpace: a router and one LoRA expert per cluster",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


api.add_middleware(GateMiddleware)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if "/v1/" in request.url.path:  # the OpenAI routes answer in OpenAI's shape
        return openai_validation_error(exc.errors()).response()
    return JSONResponse(validation_error_body(exc.errors()), status_code=422)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validates, routes, generates (see the module docstring)."""

    def __init__(
        self,
        router: DeploymentHandle,
        experts: DeploymentHandle,
        info: dict,
        cfg: ServeConfig,
        clients: Clients | None = None,
    ):
        """``clients``: the API keys' digests, each with its client's name, and the clients'
        own shares (``client_keys``), resolved where the app is built (the driver: on a
        cluster the replica's own environment is the raylet's, not the user's shell)."""
        bind_replica_grpc_to_node()  # before Ray's _on_initialized binds it
        self.router, self.experts, self.info_, self.cfg = router, experts, info, cfg
        install_gate(
            Gate.for_serving(cfg, clients)
        )  # keys, Host, shares, body size: GateMiddleware
        self.ensembles_running = 0

    def _docs_allowed(self) -> None:
        if not self.cfg.api_docs:  # the same reply as any unknown path
            raise HTTPException(404, "Not Found")

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._docs_allowed()
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._docs_allowed()
        url = request.scope.get("root_path", "") + "/openapi.json"
        return get_swagger_ui_html(openapi_url=url, title="gs-ray")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._docs_allowed()
        url = request.scope.get("root_path", "") + "/openapi.json"
        return get_redoc_html(openapi_url=url, title="gs-ray")

    @api.get("/healthz")
    async def healthz(self) -> str:
        return "ok"

    @api.get("/info")
    async def info(self) -> dict:
        return self.info_

    def _check_size(self, prompt: str, openai: bool = False) -> None:
        """A prompt over ``serve.max_prompt_chars`` is refused before the router sees it."""
        limit = self.cfg.max_prompt_chars
        if len(prompt) > limit:
            message = f"prompt: {len(prompt)} characters is over the limit {limit}"
            if openai:
                raise OpenAIError(400, message, "prompt", CONTEXT_LENGTH_EXCEEDED)
            raise HTTPException(400, f"{message} (serve.max_prompt_chars)")

    @api.post("/route")
    async def route(self, req: RouteRequest) -> dict:
        self._check_size(req.prompt)
        start = time.perf_counter()
        out = await self.router.route.remote(req.prompt)
        return {**out, "route_ms": 1000 * (time.perf_counter() - start)}

    @api.post("/generate")
    async def generate(self, req: GenerateRequest) -> dict:
        self._check_size(req.prompt)
        k_total = self.info_["n_experts"]
        m = req.max_new_tokens or self.cfg.max_new_tokens
        if m > self.cfg.max_new_tokens_limit:
            raise HTTPException(
                400,
                f"max_new_tokens: {m} is over the limit "
                f"{self.cfg.max_new_tokens_limit} (serve.max_new_tokens_limit)",
            )
        if req.expert is not None and req.expert >= k_total:
            raise HTTPException(400, f"expert: {req.expert} is not in [0, {k_total})")
        start = time.perf_counter()
        if req.expert is None:
            routed = await self.router.route.remote(req.prompt)
            expert, probs, by = routed["expert"], routed["probs"], "router"
        else:
            expert, probs, by = req.expert, None, "request"
        route_ms = 1000 * (time.perf_counter() - start)
        out = await self.experts.generate.remote((req.prompt, expert, m))
        if "error" in out:
            raise HTTPException(500 if out.get("server_error") else 400, out["error"])
        total_ms = 1000 * (time.perf_counter() - start)
        return {
            "expert": expert,
            "routed_by": by,
            "probs": probs,
            **out,
            "route_ms": route_ms,
            "total_ms": total_ms,
        }

    # ------------------------------------------------------------------ OpenAI-compatible routes

    def _models(self) -> list[str]:
        experts = [expert_model(k) for k in range(self.info_["n_experts"])]
        general = [GENERALIST_MODEL] if self.info_.get("generalist") is not None else []
        return [MODEL, ENSEMBLE_MODEL] + experts + general

    @api.get("/v1/models")
    async def models(self) -> dict:
        created = 0
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": APP_NAME}
                for m in self._models()
            ],
        }

    @api.post("/v1/route")
    async def v1_route(self, req: RouteRequest) -> dict:
        return await self.route(req)

    async def _plan(self, req: OpenAIRequest, prompt: str) -> dict[str, Any]:
        """Check the model and length, route (or not): what both generation paths share."""
        self._check_size(prompt, openai=True)
        if req.model not in self._models():
            raise OpenAIError(
                404,
                f"model: {req.model!r} does not exist; GET /v1/models lists them",
                "model",
                "model_not_found",
            )
        m = req.max_tokens or self.cfg.max_new_tokens
        if req.model == ENSEMBLE_MODEL and not req.max_tokens:
            m = min(m, self.cfg.ensemble_max_new_tokens)
        if m > self.cfg.max_new_tokens_limit:
            raise OpenAIError(
                400,
                f"max_tokens: {m} is over the limit {self.cfg.max_new_tokens_limit}",
                "max_tokens",
            )
        if req.model == ENSEMBLE_MODEL and m > self.cfg.ensemble_max_new_tokens:
            raise OpenAIError(
                400,
                f"max_tokens: {m} is over the ensemble's limit {self.cfg.ensemble_max_new_tokens}",
                "max_tokens",
            )
        start = time.perf_counter()
        probs, routed = None, {}
        if req.model == MODEL or req.model == ENSEMBLE_MODEL:
            routed = await self.router.route.remote(prompt)
            expert, probs = routed["expert"], routed["probs"]
        elif req.model == GENERALIST_MODEL:
            expert = self.info_["generalist"]
        else:
            expert = int(req.model.rsplit("-", 1)[1])
        route_ms = 1000 * (time.perf_counter() - start)
        mode: Mode = None
        if req.model == ENSEMBLE_MODEL:
            # The experts' mixture by the router's probabilities (the generalist, if served,
            # takes no weight).
            pad = [0.0] if self.info_.get("generalist") is not None else []
            mode, expert = Mixture(list(probs) + pad), MIXTURE
        elif req.temperature > 0:
            mode = Sampling(float(req.temperature), float(req.top_p), req.seed)
        return {
            "start": start,
            "m": m,
            "expert": expert,
            "probs": probs,
            "mode": mode,
            "route_ms": route_ms,
            "fallback": bool(routed.get("fallback")),
            "reason": routed.get("reason"),
        }

    def _take_ensemble_slot(self, req: OpenAIRequest) -> bool:
        """An ensemble request (a forward of every expert per token) takes one of
        ``serve.max_ensemble_requests`` slots of this replica, or is refused (429); True when
        a slot was taken (give it back with ``_give_back``)."""
        if req.model != ENSEMBLE_MODEL:
            return False
        if self.ensembles_running >= self.cfg.max_ensemble_requests:
            raise OpenAIError(
                429,
                f"{self.ensembles_running} ensemble requests are running, the "
                f"limit (serve.max_ensemble_requests); retry later, or name "
                f"{MODEL} (routed)",
                "model",
                "rate_limit_exceeded",
                "rate_limit_error",
            )
        self.ensembles_running += 1
        return True

    def _give_back(self, slot: bool) -> None:
        if slot:
            self.ensembles_running -= 1

    @staticmethod
    def _generation_error(out: dict[str, Any]) -> OpenAIError:
        message = out["error"]
        if out.get("server_error"):
            return OpenAIError(500, message, None, None, "server_error")
        return OpenAIError(400, message, message.split(":")[0], out.get("code"))

    def _result(
        self, req: OpenAIRequest, plan: dict, out: dict, text: str, stopped: bool
    ) -> dict[str, Any]:
        expert = plan["expert"]
        return {
            "text": text,
            "finish_reason": "stop" if stopped else out["finish_reason"],
            "usage": {
                "prompt_tokens": out["n_prompt_tokens"],
                "completion_tokens": out["n_new_tokens"],
                "total_tokens": out["n_prompt_tokens"] + out["n_new_tokens"],
            },
            "gs_ray": {
                "expert": None if expert == MIXTURE else expert,
                "probs": plan["probs"],
                "routed_by": ("fallback" if plan["fallback"] else "router")
                if req.model == MODEL
                else ("ensemble" if expert == MIXTURE else "request"),
                "generalist": expert >= 0 and expert == self.info_.get("generalist"),
                "reason": plan["reason"],
                "route_ms": plan["route_ms"],
                "total_ms": 1000 * (time.perf_counter() - plan["start"]),
            },
        }

    async def _complete(
        self, req: OpenAIRequest, prompt: str, chat: list[dict[str, str]] | None = None
    ) -> dict[str, Any]:
        """Route (or not), generate, cut at stop: the non-streamed body of both OpenAI routes."""
        plan = await self._plan(req, prompt)
        slot = self._take_ensemble_slot(req)
        try:
            # a chat goes to the experts as messages (their chat template, if any); the router
            # sees the instruction
            out = await self.experts.generate.remote(
                (chat or prompt, plan["expert"], plan["m"], plan["mode"])
            )
        finally:
            self._give_back(slot)
        if "error" in out:
            raise self._generation_error(out)
        text, stopped = cut_at_stop(out["text"], req.stop)
        return self._result(req, plan, out, text, stopped)

    async def _stream(
        self,
        req: OpenAIRequest,
        prompt: str,
        chat: list[dict[str, str]] | None,
        head: dict[str, Any],
        choice: Callable[[str, str | None], dict[str, Any]],
        opening: dict[str, Any] | None = None,
    ) -> StreamingResponse:
        """The streamed body of both OpenAI routes: chunks as the expert generates (``choice(
        text, finish_reason)`` shapes one; ``opening``, the chat's role, goes first).
        The first piece is awaited before the response starts, so a request that cannot be
        served still gets its 400. The finish chunk carries ``usage`` and ``gs_ray``; with
        ``stream_options.include_usage`` one more chunk with no choices carries ``usage``. A
        failure after the first chunk ends the stream with an ``{"error": ...}`` event (OpenAI's
        shape) and ``[DONE]``; a client that goes away cancels the generation."""
        plan = await self._plan(req, prompt)
        slot = self._take_ensemble_slot(req)
        try:
            pieces = self.experts.options(stream=True).stream.remote(
                chat or prompt, plan["expert"], plan["m"], plan["mode"]
            )
            first = await pieces.__anext__()
        except BaseException:
            self._give_back(slot)
            raise
        if "error" in first:
            self._give_back(slot)
            pieces.cancel()
            raise self._generation_error(first)

        async def chunks() -> AsyncIterator[dict]:
            finished = False
            try:
                cutter = StopCutter(req.stop)
                if opening is not None:
                    yield {**head, "choices": [opening]}
                item, sent = first, []
                while "done" not in item:
                    if "error" in item:
                        yield self._generation_error(item).body()
                        return
                    text = cutter.feed(item["text"])
                    if text:
                        sent.append(text)
                        yield {**head, "choices": [choice(text, None)]}
                    item = await pieces.__anext__()
                finished = True
                rest = cutter.finish()
                if rest:
                    sent.append(rest)
                    yield {**head, "choices": [choice(rest, None)]}
                out = self._result(req, plan, item, "".join(sent), cutter.stopped)
                yield {
                    **head,
                    "choices": [choice("", out["finish_reason"])],
                    "usage": out["usage"],
                    "gs_ray": out["gs_ray"],
                }
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": out["usage"]}
            except Exception as e:  # e.g. the experts replica died: say so, then [DONE]
                log.exception("a stream failed after its first chunk")
                yield OpenAIError(
                    500, f"generation failed ({type(e).__name__})", None, None, "server_error"
                ).body()
            finally:  # also when the client went away (the response's task is cancelled)
                self._give_back(slot)
                if not finished:
                    pieces.cancel()

        return sse_response(chunks())

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:

            def choice(text: str, finish: str | None) -> dict[str, Any]:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

            return await self._stream(req, req.prompt, None, head, choice)
        out = await self._complete(req, req.prompt)
        choice = {
            "index": 0,
            "text": out["text"],
            "logprobs": None,
            "finish_reason": out["finish_reason"],
        }
        return {**head, "choices": [choice], "usage": out["usage"], "gs_ray": out["gs_ray"]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest) -> Any:
        chat = [{"role": m.role, "content": m.content} for m in req.messages]
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:

            def delta(text: str, finish: str | None) -> dict[str, Any]:
                d = {"content": text} if text else {}
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

            role = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return await self._stream(req, chat_prompt(req.messages), chat, chunk_head, delta, role)
        out = await self._complete(req, chat_prompt(req.messages), chat)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"]},
            "logprobs": None,
            "finish_reason": out["finish_reason"],
        }
        return {
            **head,
            "object": "chat.completion",
            "choices": [choice],
            "usage": out["usage"],
            "gs_ray": out["gs_ray"],
        }


# --------------------------------------------------------------------------- building the app


def _expert_gpus(cfg: ServeConfig) -> float:
    if cfg.expert_gpus is not None:
        return cfg.expert_gpus
    import ray

    from gs_ray.ray_utils import cluster_has_gpu

    return 1.0 if ray.is_initialized() and cluster_has_gpu() else 0.0


def app_for_run(run_dir: str, cfg: ServeConfig | None = None):
    """The Serve application for a finished run; ``cfg`` defaults to the run's own ``serve``
    section. Raises ``ServingError`` naming what the run lacks."""
    served = ServedRun.open(run_dir)
    cfg = cfg or served.cfg.serve
    run_dir = str(served.run.path.resolve())
    experts_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.expert_cpus, "num_gpus": _expert_gpus(cfg)},
        "max_ongoing_requests": 4 * cfg.max_batch_size,
        "max_queued_requests": cfg.max_queued_requests,
    }
    if cfg.expert_max_replicas and cfg.expert_max_replicas > cfg.expert_replicas:
        experts_opts["autoscaling_config"] = {
            "min_replicas": cfg.expert_replicas,
            "max_replicas": cfg.expert_max_replicas,
            "target_ongoing_requests": cfg.max_batch_size,
        }
    else:
        experts_opts["num_replicas"] = cfg.expert_replicas
    router = RouterDeployment.options(
        ray_actor_options={"num_cpus": cfg.router_cpus},
        max_ongoing_requests=4 * cfg.max_batch_size,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(run_dir, cfg)
    experts = ExpertsDeployment.options(**experts_opts).bind(run_dir, cfg)
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0.1}, max_queued_requests=cfg.max_queued_requests
    ).bind(router, experts, served.info(), cfg, client_keys(cfg))
    return ingress


def serve_config_for(run_dir: str, overrides: list[str] | None = None) -> ServeConfig:
    """The run's ``serve`` section with ``--serve.field value`` overrides applied."""
    cfg: Config = ServedRun.open(run_dir).cfg
    return apply_overrides(cfg, overrides).serve if overrides else cfg.serve


def build_app(args: dict[str, Any]):
    """Serve's application builder (``serve run gs_ray.serving.app:build_app run_dir=DIR``, or
    ``import_path`` in ``serve/config.yaml``): ``run_dir`` plus any ``serve`` field as a key."""
    args = dict(args)
    if "run_dir" not in args:
        raise ServingError("build_app needs the argument run_dir (a finished gs-ray run)")
    run_dir = str(args.pop("run_dir"))
    overrides = [x for key, value in args.items() for x in (f"--serve.{key}", str(value))]
    return app_for_run(run_dir, serve_config_for(run_dir, overrides))
