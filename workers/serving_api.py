"""HTTP schemas of the serving stage: the request fields both endpoints share (SamplingRequest), the OpenAI-style
/v1/completions request and response, error bodies, SSE framing (the chat schemas: workers/serving_chat.py).

Pure pydantic + stdlib (no Ray, no torch): the ingress validates at the boundary with these models, and the sampler
deployment returns plain dicts shaped like them. Every rejection names the offending field (`error.param`).

Status codes (all JSON bodies ``{"error": {"message", "type", "param", "code"}}``):
  400  malformed JSON, or a request the model cannot serve (prompt + max_tokens beyond the context, sampler refusal)
  401  a key is configured and the request lacks ``Authorization: Bearer <key>`` or carries another key
  404  unknown ``model``
  413  body larger than ``max_body_bytes``, or a prompt longer than ``max_prompt_tokens``
  422  wrong type / out-of-range field: the app's OpenAPI schema states every bound, the configured ones included
       (max_tokens, steps, n, block_length, prompts, stop strings)
  503  the sampler queue is full (back-pressure) or no replica is available
  504  the request ran past ``request_timeout_s``
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# the one list of names (torch-free), also the API's types
from models.names import (ALGORITHMS, CACHE_MODES, TRANSPARENCY, Algorithm, CacheMode,  # noqa: F401  (re-exported)
                          Transparency)

# the largest integer a JSON number holds exactly (an IEEE double): the schema, JavaScript clients and the seed the
# server draws and returns all agree on it
MAX_SEED = 2**53 - 1
NonEmptyStr = Annotated[str, Field(min_length=1)]
# Request fields bounded by the server's configuration (ServeConfig): (JSON-schema keyword, limits key). The OpenAPI
# schema carries the configured bound (schema_limits) and check_bounds enforces it, from this one table.
CONFIGURED_BOUNDS = {"max_tokens": ("maximum", "max_tokens_limit"), "steps": ("maximum", "max_steps"),
                     "n": ("maximum", "max_n"), "block_length": ("maximum", "max_tokens_limit"),
                     "prompt": ("maxItems", "max_prompts"), "stop": ("maxItems", "max_stop")}


class SamplingRequest(BaseModel):
    """The request fields /v1/completions and /v1/chat/completions share: the OpenAI sampling subset plus the
    diffusion extensions. Fields left ``None`` take the server defaults (``ServeConfig.default_*``)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    model: str | None = Field(None, description="served model name (GET /v1/models; 404 for another); None = the "
                                                "served model")
    max_tokens: int | None = Field(None, ge=1, description="completion length in tokens (the diffusion canvas size); "
                                                           "the prompt's tokens + max_tokens must fit the model's "
                                                           "max_seq_len (GET /v1/models), else 400")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="sampling temperature; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    n: int = Field(1, ge=1, description="completions per prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed; None = the server draws one "
                                                                   "(returned in the response)")
    stream: bool = Field(False, description="server-sent events: one event per denoising step (or block), then the "
                                            "final text")
    stop: Union[NonEmptyStr, list[NonEmptyStr], None] = Field(None, description="stop string(s): the completion is "
                                                                            "cut before the first occurrence")
    user: str | None = Field(None, description="OpenAI end-user id; accepted and ignored")
    # --- diffusion extensions
    steps: int | None = Field(None, ge=1, description="denoising steps (NFE budget)")
    algorithm: Algorithm | None = Field(None, description=f"unmasking order: one of {list(ALGORITHMS)}")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block size in tokens; None, or "
                                                             "one over max_tokens = one block")
    soft_mask: bool | None = Field(None, description="feed the previous step's top-k prediction into masked "
                                                     "positions (soft-masking); false = binary masking")
    transparency: Transparency | None = Field(None, description="soft-masking transparency schedule: none, linear "
                                                                "(fade the feedback out as tokens are decoded) or "
                                                                "stepwise (feedback while over half is masked); None = "
                                                                "the server default")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="algorithm threshold: each step reveals every "
                                                                      "masked position of the block whose drawn token "
                                                                      "has at least this probability (at least one); "
                                                                      "None = the sampler's default")
    cache: CacheMode | None = Field(None, description=f"key/value cache of block decoding, one of {list(CACHE_MODES)}: "
                                                      "prefix / dual recompute the block and what follows / the block "
                                                      "only after each block's first step (approximate; 400 for a model "
                                                      "that cannot cache); None = none")
    return_trajectory: bool = Field(False, description="include the partial text of every recorded step in each "
                                                       "choice")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def bounded_values(self) -> dict:
        """The values CONFIGURED_BOUNDS limits (a list field by its length); fields a request kind lacks are absent."""
        return {"max_tokens": self.max_tokens, "steps": self.steps, "n": self.n, "block_length": self.block_length,
                "stop": len(self.stops())}

    def source(self) -> dict:
        """What the sampler conditions on, as the payload carries it (``prompts``, or chat ``messages``)."""
        raise NotImplementedError


class CompletionRequest(SamplingRequest):
    """POST /v1/completions body: the OpenAI completions subset plus diffusion extensions."""

    prompt: Union[str, Annotated[list[str], Field(min_length=1)]] = Field(
        ..., description="prompt text, or a list of prompts (one completion each); an empty prompt asks for "
                         "unconditional generation. A prompt longer than the server's max_prompt_tokens gets 413")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def bounded_values(self) -> dict:
        return {**super().bounded_values(), "prompt": len(self.prompts())}

    def source(self) -> dict:
        return {"prompts": self.prompts(), "messages": None}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    """What a choice of either endpoint carries besides its text."""

    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    trajectory: list[str] | None = Field(None, description="partial texts (masked positions shown as the "
                                                             "placeholder) of the recorded steps")


class CompletionChoice(Choice):
    text: str


class SoftMaskFeedback(BaseModel):
    lambda_mean: float = Field(..., description="mean λ (the weight of the fed-back top-k mixture) over every masked "
                                                "position the decode fed")
    gate_open: float = Field(..., description="share of those positions whose SM gate was open (>= 0.5): prediction "
                                              "entropy below −ω_b")


class DecodeInfo(BaseModel):
    """What the decode of a response did (both endpoints' responses carry it)."""

    usage: Usage
    nfe: int = Field(..., description="network function evaluations used for this batch")
    batch_size: int = Field(..., description="requests decoded together in the same sample() call")
    batch_rows: int = Field(..., description="sequences decoded together in the same sample() call")
    steps: int
    algorithm: str
    soft_mask: bool
    sm_feedback: SoftMaskFeedback | None = Field(None, description="what soft-masking did in this batch's decode; null "
                                                                   "when no feedback ran (soft_mask false, or a "
                                                                   "self-conditioning model)")
    transparency: str = Field("none", description="soft-masking transparency schedule used")
    seed: int | None = Field(None, description="seed that reproduces this response (sent back as `seed`); null when "
                                             "the request shared its decode with others")
    length: int = Field(..., description="decoded canvas length (prompt + completion, rounded up to a bucket)")


class CompletionResponse(DecodeInfo):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]


class SoftMaskState(BaseModel):
    omega_s: float = Field(..., description="ω_s: the largest λ the head gives (≈1e-6 at initialisation: no feedback)")
    omega_a: float = Field(..., description="ω_a: steepness of the gate in the prediction's negative entropy")
    omega_b: float = Field(..., description="ω_b: the gate opens where the prediction's entropy is below −ω_b nats")
    k: int | None = Field(..., description="top-k tokens mixed into a masked position (None: the whole vocabulary)")
    temperature: float | None = Field(None, description="learned mixing temperature (k = None only)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softmask"
    max_seq_len: int
    vocab_size: int
    flavor: str
    soft_mask: SoftMaskState | None = Field(None, description="the served model's soft-masking head; null for a "
                                                              "self-conditioning model")
    chat_template: Literal["tokenizer", "plain"] = Field("plain", description="how /v1/chat/completions renders "
                                                                             "messages: the tokenizer's own chat "
                                                                             "template, or the plain User:/Assistant: "
                                                                             "template")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ApiError(Exception):
    """A request rejected at the boundary; rendered as the JSON error body with ``status``."""

    def __init__(self, status: int, param: str | None, message: str, code: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.status, self.param, self.message, self.code = status, param, message, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        msg = f"{self.param}: {self.message}" if self.param else self.message
        return {"error": {"message": msg, "type": kind, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict:
        """Plain form that crosses the Ray boundary (exceptions are not sent between deployments)."""
        return {"status": self.status, "param": self.param, "message": self.message, "code": self.code}

    @classmethod
    def from_dict(cls, d: dict) -> "ApiError":
        return cls(int(d["status"]), d.get("param"), str(d["message"]), d.get("code"))


def validation_error(errors: list[dict]) -> ApiError:
    """Map pydantic/FastAPI validation errors to one ApiError naming the first bad field (400 for bad JSON)."""
    # a union reports one error per member; the member that had the right type says what is wrong with the value
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), None) or (errors[0] if errors
                                                                                                 else None)
    first = first or {"loc": (), "msg": "invalid request", "type": "value_error"}
    # Union members add their type to loc (prompt.str, stop.list[constrained-str].0); keep the field names only.
    loc = [p for p in first.get("loc", ()) if isinstance(p, str) and p.isidentifier() and p != "body"
           and p not in ("str", "int", "float", "bool", "none")]
    param = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        return ApiError(400, "body", f"invalid JSON ({first.get('msg', '')})", "json_invalid")
    if first.get("type") == "extra_forbidden":
        return ApiError(422, param, "unknown field", "extra_forbidden")
    if first.get("type") == "missing":
        return ApiError(422, param, "field required", "missing")
    return ApiError(422, param, str(first.get("msg", "invalid value")), first.get("type"))


def check_bounds(req: SamplingRequest, limits: dict) -> None:
    """Configured bounds (``ServeConfig``) and the served model name, as the app's OpenAPI schema states them
    (schema_limits); raises ApiError (422, or 404 for the model) naming the field.

    ``limits`` keys: max_tokens_limit, max_steps, max_n, max_prompts, max_stop, served model name ``model_name``.
    """
    if req.model is not None and req.model != limits["model_name"]:
        raise ApiError(404, "model", f"model {req.model!r} is not served here (served: {limits['model_name']!r})",
                       "model_not_found")
    values = req.bounded_values()
    for name, (_, key) in CONFIGURED_BOUNDS.items():
        value, bound = values.get(name), limits[key]
        if value is not None and value > bound:
            what = "number of prompts" if name == "prompt" else ("number of stop strings" if name == "stop" else "value")
            raise ApiError(422, name, f"{what} {value} exceeds the server limit {bound}", "limit_exceeded")


def schema_limits(request_schema: dict, limits: dict) -> None:
    """Write what check_bounds enforces into the OpenAPI schema of a SamplingRequest, in place: the configured bounds
    (CONFIGURED_BOUNDS; an integer field gets its ``maximum``, a list field or the list member of a union its
    ``maxItems``; a field the request kind lacks is skipped) and the served model name (the ``enum`` of ``model``)."""
    props = request_schema["properties"]

    def members(name: str, kind: str) -> list[dict]:
        if name not in props:
            return []
        return [node for node in [props[name], *props[name].get("anyOf", [])] if node.get("type") == kind]

    for name, (keyword, key) in CONFIGURED_BOUNDS.items():
        for node in members(name, "integer" if keyword == "maximum" else "array"):
            node[keyword] = limits[key]
    for node in members("model", "string"):
        node["enum"] = [limits["model_name"]]


def sse(data: dict | str) -> bytes:
    """One server-sent event frame (``data: ...\\n\\n``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
