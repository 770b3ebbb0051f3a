"""/v1/chat/completions: the request and response schemas, how messages become the prompt, and how the sampler's
completion results and stream events become OpenAI chat objects (``chat.completion`` / ``chat.completion.chunk``).

A chat request is decoded exactly like a one-prompt completion request (same payload, same sampler batching); only
the prompt comes from the messages and the answer is reshaped here. The messages become the prompt with:
  - the tokenizer's own chat template, when the tokenizer folder carries one (an HF tokenizer: ``chat_template.jinja``
    or ``chat_template`` in ``tokenizer_config.json``), with the generation prompt appended; its special tokens are
    encoded as such;
  - otherwise the plain template :data:`PLAIN_TEMPLATE`: one ``<Role>: <content>`` line per message and a final
    ``Assistant:`` line, encoded as plain text; the completion also stops before ``PLAIN_TEMPLATE.stop`` (the model
    starting the user's next turn).

Pure pydantic + stdlib at import; ``ChatTemplate.load`` imports transformers only for a tokenizer with a template.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from workers.serving_api import Choice, DecodeInfo, SamplingRequest

Role = Literal["system", "developer", "user", "assistant"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(..., description="only text parts are served")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role = Field(..., description="system, developer, user or assistant")
    content: Union[str, Annotated[list[TextPart], Field(min_length=1)]] = Field(
        ..., description="the message text, or a list of text parts (joined)")
    name: str | None = Field(None, description="OpenAI participant name; accepted and ignored")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk (empty choices) with the usage")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions body: the OpenAI chat subset plus the diffusion extensions of SamplingRequest."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        ..., description="the conversation so far; rendered into one prompt (the tokenizer's chat template, else the "
                         "plain template), the reply is the next assistant turn")
    stream_options: StreamOptions | None = Field(None, description="streaming options (stream: true only)")

    def source(self) -> dict:
        return {"prompts": [], "messages": [{"role": m.role, "content": m.text()} for m in self.messages]}


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Choice):
    message: ChatReply


class ChatCompletionResponse(DecodeInfo):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]


# ------------------------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class PlainTemplate:
    """The chat template of a tokenizer without one: ``<Role>: <content>\\n`` per message, then ``Assistant:``."""

    roles: tuple = (("system", "System"), ("developer", "System"), ("user", "User"), ("assistant", "Assistant"))
    reply: str = "Assistant:"
    stop: tuple = ("\nUser:",)

    def render(self, messages: list[dict]) -> str:
        names = dict(self.roles)
        return "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages) + self.reply


PLAIN_TEMPLATE = PlainTemplate()


class ChatTemplate:
    """How one served tokenizer turns messages into prompt ids: its HF chat template, else PLAIN_TEMPLATE."""

    def __init__(self, tok, hf=None):
        self.tok, self.hf = tok, hf  # hf: a transformers tokenizer whose chat_template is set, or None

    @classmethod
    def load(cls, tok, folder: Path | None) -> "ChatTemplate":
        """``tok`` (models.tokenizer.TextTokenizer) and the folder its files came from (None: a named tokenizer)."""
        if folder is None or not has_chat_template(folder):
            return cls(tok)
        from transformers import AutoTokenizer

        return cls(tok, AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    @property
    def name(self) -> str:
        return "tokenizer" if self.hf is not None else "plain"

    @property
    def stop(self) -> list[str]:
        return [] if self.hf is not None else list(PLAIN_TEMPLATE.stop)

    def render(self, messages: list[dict]) -> str:
        if self.hf is None:
            return PLAIN_TEMPLATE.render(messages)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids: the HF template's special tokens as tokens; the plain template as plain text."""
        text = self.render(messages)
        if self.hf is None:
            return self.tok.encode(text)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def has_chat_template(folder: Path) -> bool:
    """Whether an HF tokenizer folder carries a chat template (file, or key of tokenizer_config.json)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError):
        return False


def tokenizer_folder(spec: str) -> Path | None:
    """The folder a tokenizer spec's files live in (a dir, a tokenizer.json's parent); None for a named one."""
    path = Path(spec).expanduser()
    return path if path.is_dir() else (path.parent if path.is_file() else None)


# ------------------------------------------------------------------------------------------------ responses
def chat_response(out: dict) -> dict:
    """The sampler's final completion dict (one prompt) as a ``chat.completion``."""
    choices = []
    for c in out["choices"]:
        choice = {"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                  "finish_reason": c["finish_reason"], "logprobs": None}
        if "trajectory" in c:
            choice["trajectory"] = c["trajectory"]
        choices.append(choice)
    return {**out, "object": "chat.completion", "choices": choices}


class ChatChunks:
    """The ``chat.completion.chunk`` frames of one streamed chat request, from the sampler's events.

    Order: one role chunk per choice; per recorded denoising step one progress chunk (each choice's ``delta`` empty,
    its current partial text in the extension field ``partial``, ``step``/``steps`` at the top); then per choice one
    chunk with the whole reply as ``delta.content`` and its ``finish_reason``; with ``stream_options.include_usage``
    a last chunk with empty ``choices`` and the ``usage``. Concatenating each choice's ``delta.content`` gives the
    non-streamed reply.
    """

    def __init__(self, request_id: str, model: str, n: int, include_usage: bool):
        self.id, self.model, self.n, self.include_usage = request_id, model, n, include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return [self._chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}]) for c in range(self.n)]

    def frames(self, event: dict) -> list[dict]:
        """Chunks for one sampler event: a ``step`` (text_completion.step) or the ``final`` completion."""
        data = event["data"]
        if event["type"] == "step":
            return [self._chunk([{"index": c["index"], "delta": {}, "finish_reason": None, "logprobs": None,
                                  "partial": c["text"]} for c in data["choices"]],
                                step=data["step"], steps=data["steps"])]
        frames = [self._chunk([{"index": c["index"], "delta": {"content": c["text"]},
                                "finish_reason": c["finish_reason"], "logprobs": None}]) for c in data["choices"]]
        if self.include_usage:
            frames.append(self._chunk([], usage=data["usage"]))
        return frames
