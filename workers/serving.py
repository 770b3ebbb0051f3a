"""Ray Serve application of the soft-mask sampler: a FastAPI ingress in front of a batching sampler deployment.

    HTTP --> CompletionsIngress (CPU, FastAPI: API key, schema, bounds, body size, timeouts, SSE;
               /v1/completions and /v1/chat/completions share one payload, see workers/serving_chat.py)
               --handle--> SamplerDeployment (weights loaded once; @serve.batch groups compatible requests and
                           decodes each group in ONE models.sampling.sample call; see workers/serving_sampler.py)

``build_app(ServeConfig) -> serve.Application`` is the typed builder (also usable as ``serve run
workers.serving:build_app checkpoint=...``). ``workers.serving_config.resolve_checkpoint`` brings an ``s3://`` checkpoint into a local
cache (atomic, re-downloaded only when the remote listing changes).

NOTE: no import-time side effects: the FastAPI app is built per replica in ``__serve_build_asgi_app__``; torch and
models/ are imported inside the sampler replica only.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import uuid

from ray import serve

from infra.config import to_dict
from workers.serving_api import (SSE_DONE, ApiError, CompletionRequest, SamplingRequest, check_bounds, schema_limits,
                                 sse, validation_error)
from workers.serving_chat import ChatChunks, ChatCompletionRequest, chat_response
from workers.serving_config import ServeConfig, as_serve_config, read_api_key, resolve_checkpoint
from workers.serving_sampler import SamplerDeployment


def request_payload(req: SamplingRequest, cfg: ServeConfig, request_id: str) -> dict:
    """The request with every server default filled in: what the sampler deployment receives (``prompts``, or the
    chat ``messages`` the sampler renders with its tokenizer's template)."""
    max_tokens = req.max_tokens if req.max_tokens is not None else cfg.default_max_tokens
    block = req.block_length if req.block_length is not None else cfg.default_block_length
    if block is not None and block > max_tokens:  # a block longer than the completion: the completion is one block
        block = None
    return {
        "id": request_id, **req.source(), "n": req.n, "max_tokens": max_tokens,
        "steps": req.steps if req.steps is not None else cfg.default_steps,
        "algorithm": req.algorithm or cfg.default_algorithm,
        "soft_mask": cfg.default_soft_mask if req.soft_mask is None else req.soft_mask,
        "temperature": cfg.default_temperature if req.temperature is None else req.temperature,
        "top_p": cfg.default_top_p if req.top_p is None else req.top_p,
        "transparency": req.transparency or cfg.default_transparency,
        "threshold": req.threshold, "cache": req.cache,  # None: the sampler's defaults
        "block_length": block, "seed": req.seed, "stop": req.stops(), "stream": req.stream,
        "return_trajectory": req.return_trajectory, "timeout_s": cfg.request_timeout_s,
    }


# ------------------------------------------------------------------------------------------------- HTTP ingress
class BodyLimitMiddleware:
    """Pure-ASGI guard: a request body larger than ``max_bytes`` gets 413 before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send) -> None:
        body = json.dumps(ApiError(413, "body", f"request body exceeds {self.max_bytes} bytes",
                                   "body_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:  # buffer (bounded) so that a body without content-length is also capped
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """Pure-ASGI guard: with a key configured, every request but ``/healthz`` needs ``Authorization: Bearer <key>``;
    a missing or wrong key gets 401 in the API's error shape before anything parses the body."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").rstrip("/").endswith("/healthz"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if given is None
                   else "incorrect API key")
        body = json.dumps(ApiError(401, None, message, "invalid_api_key").body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def build_fastapi(ing: "CompletionsIngress"):
    """The FastAPI app of one ingress replica (routes close over the replica: its config and sampler handle)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from workers.serving_api import CompletionResponse, ModelList
    from workers.serving_chat import ChatCompletionResponse

    cfg = ing.cfg
    app = FastAPI(title="softmask", version="0.1.0",
                  description="Soft-masked diffusion LM sampler: OpenAI-style completions with diffusion extensions")
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    if ing.api_key is not None:  # added last: the outermost layer, before the body is read
        app.add_middleware(ApiKeyMiddleware, key=ing.api_key)
    # NOTE: Serve registers its own plain-text 503 handler for these after this app is built, so they are turned
    # into ApiError where the handle is awaited instead of through an exception handler.
    overloaded = (BackPressureError, DeploymentUnavailableError)

    def overload_error(e: Exception) -> ApiError:
        return ApiError(503, None, f"server overloaded, retry later ({type(e).__name__})", "overloaded")

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def openapi() -> dict:
        """FastAPI's schema with this server's configured bounds in both request schemas (what check_bounds
        enforces)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schema_limits(schema["components"]["schemas"][name], cfg.limits())
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_request, exc):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(ApiError)
    async def _on_api_error(_request, exc):
        return error_response(exc)

    @app.get("/healthz")
    async def healthz():
        """200 when a sampler replica answers within 10 s (503 while starting, gone or saturated)."""
        try:
            info = await asyncio.wait_for(_awaited(ing.sampler.describe.remote()), timeout=10)
        except Exception as e:  # noqa: BLE001 - not healthy, but the ingress stays up
            return error_response(ApiError(503, None, f"sampler not ready: {type(e).__name__}: {e}", "unavailable"))
        return {"status": "ok", "model": info["id"]}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [await ing.model_info()]}

    async def complete(payload: dict) -> dict:
        response = ing.sampler.complete.remote(payload)
        try:
            out = await asyncio.wait_for(_awaited(response), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, None, f"request timed out after {cfg.request_timeout_s}s", "timeout") from None
        except overloaded as e:
            raise overload_error(e) from None
        except Exception as e:
            raise ApiError(500, None, f"sampler failed: {type(e).__name__}: {e}", "sampler_error") from None
        if "error" in out:
            raise ApiError.from_dict(out["error"])
        return out

    async def stream(payload: dict, opening: list[dict] = (), frames=lambda ev: [ev["data"]]) -> StreamingResponse:
        """SSE of the sampler's events: ``opening`` frames once accepted, then ``frames(event)`` per step / final
        event (default: the event's data as the completions endpoint sends it), then ``[DONE]``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.request_timeout_s
        gen = ing.sampler.options(stream=True).complete_stream.remote(payload)
        try:  # the first event says whether the sampler accepted the request (so errors keep their 4xx status)
            first = await asyncio.wait_for(gen.__anext__(), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            raise ApiError(504, None, f"request timed out after {cfg.request_timeout_s}s", "timeout") from None
        except overloaded as e:
            raise overload_error(e) from None
        except StopAsyncIteration:
            raise ApiError(500, None, "sampler closed the stream without an answer", "sampler_error") from None
        if first["type"] == "error":
            raise ApiError.from_dict(first["error"])

        async def events():
            done = False
            try:
                for frame in opening:
                    yield sse(frame)
                while True:
                    try:
                        ev = await asyncio.wait_for(gen.__anext__(), max(deadline - loop.time(), 1e-3))
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        yield sse(ApiError(504, None, f"request timed out after {cfg.request_timeout_s}s",
                                           "timeout").body())
                        break
                    if ev["type"] == "error":
                        yield sse(ApiError.from_dict(ev["error"]).body())
                        break
                    for frame in frames(ev):
                        yield sse(frame)
                    if ev["type"] == "final":
                        done = True
                yield SSE_DONE
            finally:
                if not done:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    errors = {400: {"description": "bad JSON / unservable request"}, 401: {"description": "missing or wrong API key"},
              404: {"description": "unknown model"}, 413: {"description": "body or prompt too large"},
              422: {"description": "invalid field"}, 503: {"description": "overloaded"},
              504: {"description": "timed out"}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=errors)
    async def completions(body: CompletionRequest):
        """Complete the prompt(s); with ``stream: true`` the answer is a text/event-stream of denoising steps."""
        check_bounds(body, cfg.limits())
        payload = request_payload(body, cfg, f"cmpl-{uuid.uuid4().hex}")
        if body.stream:
            return await stream(payload)
        return await complete(payload)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def chat_completions(body: ChatCompletionRequest):
        """The next assistant turn of ``messages`` (see workers/serving_chat.py for the template); with ``stream: true``
        a text/event-stream of ``chat.completion.chunk`` objects ending with ``[DONE]``."""
        check_bounds(body, cfg.limits())
        if body.stream_options is not None and not body.stream:
            raise ApiError(422, "stream_options", "only allowed with stream: true", "invalid_value")
        payload = request_payload(body, cfg, f"chatcmpl-{uuid.uuid4().hex}")
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = ChatChunks(payload["id"], cfg.served_name, body.n, usage)
            return await stream(payload, chunks.opening(), chunks.frames)
        return chat_response(await complete(payload))

    return app


async def _awaited(response):
    return await response


@serve.deployment
@serve.ingress()
class CompletionsIngress:
    """HTTP front door: API key, validation and bounds, request timeouts, back-pressure -> 503, SSE streaming."""

    def __init__(self, sampler, cfg: dict):
        self.cfg = as_serve_config(cfg)
        self.api_key = read_api_key(self.cfg)  # from this replica's environment or key file, never from the config
        self.sampler = sampler
        self._info: dict | None = None

    async def model_info(self) -> dict:
        if self._info is None:
            self._info = await asyncio.wait_for(self.sampler.describe.remote(), timeout=30)
        return self._info

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)


def build_app(args: "ServeConfig | dict") -> serve.Application:
    """The Serve application (ingress bound to a sampler deployment), configured entirely from ``args``."""
    cfg = as_serve_config(args)
    if not cfg.checkpoint.startswith("s3://"):
        resolve_checkpoint(cfg.checkpoint)  # fail fast on the driver for a bad local path
    autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                   "initial_replicas": cfg.initial_replicas or cfg.min_replicas,
                   "target_ongoing_requests": cfg.target_ongoing_requests,
                   "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s}
    sampler = SamplerDeployment.options(
        name="SoftmaskSampler", autoscaling_config=autoscaling, max_ongoing_requests=cfg.ongoing_limit,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(to_dict(cfg))
    ingress_ongoing = cfg.ongoing_limit * cfg.max_replicas + cfg.max_queued_requests
    return CompletionsIngress.options(
        name="SoftmaskIngress", num_replicas=cfg.ingress_replicas, max_ongoing_requests=ingress_ongoing,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(sampler, to_dict(cfg))


