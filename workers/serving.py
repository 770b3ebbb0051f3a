"""Ray Serve application of the soft-mask sampler: a FastAPI ingress in front of a batching sampler deployment.

    HTTP --> CompletionsIngress (CPU, FastAPI: schema, bounds, body size, timeouts, SSE)
               --handle--> SamplerDeployment (weights loaded once; @serve.batch groups compatible requests and
                           decodes each group in ONE models.sampling.sample call; see workers/serving_sampler.py)

``build_app(ServeConfig) -> serve.Application`` is the typed builder (also usable as ``serve run
workers.serving:build_app checkpoint=...``). ``resolve_checkpoint`` brings an ``s3://`` checkpoint into a local
cache (atomic, re-downloaded only when the remote listing changes).

NOTE: no import-time side effects: the FastAPI app is built per replica in ``__serve_build_asgi_app__``; torch and
models/ are imported inside the sampler replica only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from infra.config import ConfigError, field, from_dict, require, to_dict
from workers.serving_api import (ALGORITHMS, SSE_DONE, TRANSPARENCY, ApiError, CompletionRequest, check_bounds,
                                 schema_limits, sse, validation_error)
from workers.serving_sampler import SamplerDeployment


@dataclass
class ServeConfig:
    """What the serving application needs: checkpoint, batching, scaling, request bounds and sampler defaults."""

    # --- model
    checkpoint: str = field("", "checkpoint dir (config.json + model.safetensors), local path or s3://bucket/prefix")
    tokenizer: str | None = field(None, "tokenizer spec for models.tokenizer.load_tokenizer ('gpt2', a tokenizer.json "
                                        "or an HF dir); None = <checkpoint>/tokenizer.json")
    model_name: str | None = field(None, "name served by /v1/models and accepted as `model`; None = the checkpoint "
                                         "directory's name")
    cache_dir: str | None = field(None, "local cache for s3:// checkpoints; None = $SOFTMASK_CACHE/checkpoints or "
                                        "~/.cache/softmask/checkpoints")
    device: str = field("auto", "sampler device: auto (cuda when num_gpus > 0 and available), cpu or cuda")
    torch_threads: int = field(0, "torch intra-op threads in a sampler replica; 0 = keep Ray's/torch's default")
    # --- application
    app_name: str = field("softmask", "Serve application name")
    route_prefix: str = field("/", "HTTP route prefix of the application (endpoints live under it)")
    # --- batching
    max_batch_size: int = field(16, "most requests decoded together in one sample() call (1 = no batching)")
    batch_wait_timeout_s: float = field(0.01, "longest wait for a batch to fill after its first request")
    length_bucket: int = field(16, "canvas length (prompt + max_tokens) is rounded up to a multiple of this; requests "
                                   "whose canvases fall in the same power-of-two class share a sample() call")
    # --- scaling and resources
    min_replicas: int = field(1, "autoscaling: fewest sampler replicas")
    max_replicas: int = field(1, "autoscaling: most sampler replicas")
    initial_replicas: int | None = field(None, "autoscaling: replicas at deploy time (None = min_replicas)")
    target_ongoing_requests: float = field(16.0, "autoscaling: ongoing requests per sampler replica to aim for")
    upscale_delay_s: float = field(5.0, "autoscaling: sustained load needed before adding a replica")
    downscale_delay_s: float = field(30.0, "autoscaling: sustained idleness needed before removing a replica")
    max_ongoing_requests: int | None = field(None, "requests a sampler replica accepts at once (>= max_batch_size); "
                                                   "None = 2 * max_batch_size")
    max_queued_requests: int = field(256, "requests waiting for a sampler replica beyond which new ones get 503")
    num_cpus: float = field(1.0, "CPUs reserved per sampler replica (fractional is fine)")
    num_gpus: float = field(0.0, "GPUs per sampler replica (0 = CPU inference)")
    ingress_num_cpus: float = field(0.1, "CPUs reserved per ingress replica")
    ingress_replicas: int = field(1, "ingress (HTTP) replicas")
    # --- request bounds
    max_prompt_tokens: int = field(512, "longest prompt in tokens (413 beyond)")
    max_tokens_limit: int = field(512, "largest accepted `max_tokens` (422 beyond)")
    max_steps: int = field(1024, "largest accepted `steps` (422 beyond)")
    max_n: int = field(8, "largest accepted `n` (422 beyond)")
    max_prompts: int = field(16, "most prompts in one request's prompt list (422 beyond)")
    max_stop: int = field(4, "most stop strings (422 beyond)")
    max_body_bytes: int = field(1 << 20, "largest request body in bytes (413 beyond)")
    request_timeout_s: float = field(60.0, "a request still running after this gets 504 and its decode is aborted")
    # --- sampler defaults (used when the request leaves a field out)
    default_max_tokens: int = field(64, "completion length when `max_tokens` is omitted")
    default_steps: int = field(64, "denoising steps when `steps` is omitted")
    default_algorithm: str = field("ancestral", f"unmasking algorithm when omitted: one of {list(ALGORITHMS)}")
    default_soft_mask: bool = field(True, "soft-masking when `soft_mask` is omitted")
    default_temperature: float = field(1.0, "temperature when omitted")
    default_top_p: float = field(0.9, "nucleus mass when omitted (the paper samples with top-p 0.9)")
    default_block_length: int | None = field(None, "semi-AR block length when omitted (None = one block)")
    default_transparency: str = field("none", "soft-masking transparency schedule when omitted (none, linear, "
                                              "stepwise; models.sampling.TRANSPARENCY)")
    # --- streaming
    stream_max_events: int = field(32, "most intermediate step events per stream / trajectory entries per choice")
    mask_placeholder: str = field("_", "text shown for a still-masked position in partial (streamed) text")

    def __post_init__(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "is required (local dir or s3://bucket/prefix)")
        require(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0")
        require(bool(self.app_name), "app_name", "must be non-empty")
        require(self.route_prefix.startswith("/"), "route_prefix", f"must start with '/', got {self.route_prefix!r}")
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        require(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0")
        require(self.length_bucket >= 1, "length_bucket", "must be >= 1")
        require(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        require(self.max_replicas >= self.min_replicas, "max_replicas", "must be >= min_replicas")
        if self.initial_replicas is not None:
            require(self.min_replicas <= self.initial_replicas <= self.max_replicas, "initial_replicas",
                    "must lie in [min_replicas, max_replicas]")
        require(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")
        require(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0, "upscale_delay_s", "delays must be >= 0")
        if self.max_ongoing_requests is not None:
            require(self.max_ongoing_requests >= self.max_batch_size, "max_ongoing_requests",
                    f"must be >= max_batch_size={self.max_batch_size} (otherwise batches can never fill)")
        require(self.max_queued_requests >= 1, "max_queued_requests", "must be >= 1")
        require(self.num_cpus >= 0 and self.num_gpus >= 0 and self.ingress_num_cpus >= 0, "num_cpus",
                "resources must be >= 0")
        require(self.ingress_replicas >= 1, "ingress_replicas", "must be >= 1")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_steps", "max_n", "max_prompts", "max_stop",
                     "max_body_bytes", "stream_max_events"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        require(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
                "must lie in [1, max_tokens_limit]")
        require(1 <= self.default_steps <= self.max_steps, "default_steps", "must lie in [1, max_steps]")
        require(self.default_algorithm in ALGORITHMS, "default_algorithm",
                f"must be one of {list(ALGORITHMS)}, got {self.default_algorithm!r}")
        require(0.0 <= self.default_temperature <= 2.0, "default_temperature", "must lie in [0, 2]")
        require(0.0 < self.default_top_p <= 1.0, "default_top_p", "must lie in (0, 1]")
        require(self.default_block_length is None or self.default_block_length >= 1, "default_block_length",
                "must be >= 1 or null")
        require(self.default_transparency in TRANSPARENCY, "default_transparency",
                f"must be one of {list(TRANSPARENCY)}, got {self.default_transparency!r}")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.checkpoint.rstrip("/")).name or "softmask"

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def limits(self) -> dict:
        return {"max_tokens_limit": self.max_tokens_limit, "max_steps": self.max_steps, "max_n": self.max_n,
                "max_prompts": self.max_prompts, "max_stop": self.max_stop, "model_name": self.served_name}


def as_serve_config(cfg: "ServeConfig | dict") -> ServeConfig:
    """A ServeConfig from itself, a subclass instance (only the ServeConfig fields are kept) or a plain dict."""
    if isinstance(cfg, dict):
        return from_dict(ServeConfig, cfg)
    if type(cfg) is ServeConfig:
        return cfg
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    return ServeConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


# ------------------------------------------------------------------------------------------ checkpoint resolution
def default_cache_dir() -> Path:
    root = os.environ.get("SOFTMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "softmask")
    return Path(root) / "checkpoints"


def resolve_checkpoint(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local directory holding the checkpoint ``uri`` (a local path, or s3:// downloaded into ``cache_dir``).

    The cache entry is keyed by the URI and re-downloaded only when the remote listing (names, sizes, ETags) differs
    from the one recorded next to it; downloads go to a temp dir that is renamed into place (atomic, concurrent-safe).
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"checkpoint: {path} is not a checkpoint directory (no config.json)")
        return path
    from workers.shard_io import filesystem

    uri = uri.rstrip("/")
    fs, prefix = filesystem(uri)  # endpoint/credentials from the environment, listings cache off
    try:
        infos = [i for i in fs.find(prefix, detail=True).values() if i.get("type", "file") == "file"]
    except FileNotFoundError:
        infos = []
    listing = sorted((i["name"][len(prefix) + 1:], int(i.get("size") or 0), str(i.get("ETag", ""))) for i in infos)
    if not any(name == "config.json" for name, _, _ in listing):
        raise ConfigError(f"checkpoint: {uri} is not a checkpoint (no config.json under it)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache / f"{Path(prefix).name}-{key}"
    stamp = json.dumps(listing)
    if (dest / ".source.json").is_file() and (dest / ".source.json").read_text() == stamp:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache))
    try:
        for name, _, _ in listing:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{prefix}/{name}", str(tmp / name))
        (tmp / ".source.json").write_text(stamp)
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir() and (dest / "config.json").is_file():  # a concurrent download won the rename
            return dest
        raise
    return dest


def check_model(cfg: ServeConfig):
    """What a sampler replica loads, checked without loading the weights: ``(local checkpoint dir, model config,
    tokenizer)``. Raises ConfigError naming the field: a checkpoint that is missing or unreadable, a tokenizer that
    is missing or whose vocabulary or [MASK] id does not fit the model. The driver calls it before it starts
    anything (``softmask serve``, the deploy stage); each replica calls it again before it loads the weights."""
    from safetensors import safe_open

    from models.checkpoint import read_config
    from models.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(cfg.checkpoint, cfg.cache_dir)
    try:
        mcfg, _ = read_config(ckpt)
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise ConfigError(f"checkpoint: {ckpt}/config.json is not a readable model config ({e})") from None
    weights = ckpt / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: all say the same to the user
        raise ConfigError(f"checkpoint: {weights} is not a readable safetensors file ({type(e).__name__}: {e})") \
            from None
    if cfg.tokenizer is None and not (ckpt / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer: {ckpt} has no tokenizer.json; set the `tokenizer` field (e.g. gpt2 or the "
                          f"tokenizer.json the model was trained with)")
    spec = cfg.tokenizer or str(ckpt / "tokenizer.json")
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer: {spec} has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{mcfg.vocab_size}: it is not the tokenizer this model was trained with")
    if tok.mask_id != mcfg.mask_token_id:
        raise ConfigError(f"tokenizer: the [MASK] id of {spec} is {tok.mask_id}, the model's mask_token_id is "
                          f"{mcfg.mask_token_id}: it is not the tokenizer this model was trained with")
    return ckpt, mcfg, tok


def request_payload(req: CompletionRequest, cfg: ServeConfig, request_id: str) -> dict:
    """The request with every server default filled in: what the sampler deployment receives."""
    max_tokens = req.max_tokens if req.max_tokens is not None else cfg.default_max_tokens
    block = req.block_length if req.block_length is not None else cfg.default_block_length
    if block is not None and block > max_tokens:  # a block longer than the completion: the completion is one block
        block = None
    return {
        "id": request_id, "prompts": req.prompts(), "n": req.n, "max_tokens": max_tokens,
        "steps": req.steps if req.steps is not None else cfg.default_steps,
        "algorithm": req.algorithm or cfg.default_algorithm,
        "soft_mask": cfg.default_soft_mask if req.soft_mask is None else req.soft_mask,
        "temperature": cfg.default_temperature if req.temperature is None else req.temperature,
        "top_p": cfg.default_top_p if req.top_p is None else req.top_p,
        "transparency": req.transparency or cfg.default_transparency,
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


def build_fastapi(ing: "CompletionsIngress"):
    """The FastAPI app of one ingress replica (routes close over the replica: its config and sampler handle)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from workers.serving_api import CompletionResponse, ModelList

    cfg = ing.cfg
    app = FastAPI(title="softmask", version="0.1.0",
                  description="Soft-masked diffusion LM sampler: OpenAI-style completions with diffusion extensions")
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    # NOTE: Serve registers its own plain-text 503 handler for these after this app is built, so they are turned
    # into ApiError where the handle is awaited instead of through an exception handler.
    overloaded = (BackPressureError, DeploymentUnavailableError)

    def overload_error(e: Exception) -> ApiError:
        return ApiError(503, None, f"server overloaded, retry later ({type(e).__name__})", "overloaded")

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def openapi() -> dict:
        """FastAPI's schema with this server's configured bounds in CompletionRequest (what check_bounds enforces)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema_limits(schema["components"]["schemas"]["CompletionRequest"], cfg.limits())
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

    async def stream(payload: dict) -> StreamingResponse:
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
                    yield sse(ev["data"])
                    if ev["type"] == "final":
                        done = True
                yield SSE_DONE
            finally:
                if not done:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={400: {"description": "bad JSON / unservable request"}, 404: {"description": "unknown model"},
                         413: {"description": "body or prompt too large"}, 422: {"description": "invalid field"},
                         503: {"description": "overloaded"}, 504: {"description": "timed out"}})
    async def completions(body: CompletionRequest):
        """Complete the prompt(s); with ``stream: true`` the answer is a text/event-stream of denoising steps."""
        check_bounds(body, cfg.limits())
        payload = request_payload(body, cfg, f"cmpl-{uuid.uuid4().hex}")
        if body.stream:
            return await stream(payload)
        return await complete(payload)

    return app


async def _awaited(response):
    return await response


@serve.deployment
@serve.ingress()
class CompletionsIngress:
    """HTTP front door: validation and bounds, request timeouts, back-pressure -> 503, SSE streaming."""

    def __init__(self, sampler, cfg: dict):
        self.cfg = as_serve_config(cfg)
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


