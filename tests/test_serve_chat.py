"""/v1/chat/completions without Ray: request validation -> 4xx naming the field, the templates that turn messages into
the prompt (the tokenizer's own chat template, else the plain one), and the chat shapes of the sampler's results."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_support import LINES
from workers.serving import request_payload
from workers.serving_api import validation_error
from workers.serving_chat import PLAIN_TEMPLATE, ChatChunks, ChatCompletionRequest, ChatTemplate, chat_response
from workers.serving_config import ServeConfig

USER = {"role": "user", "content": "To be?"}


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "To be?"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.role"),
    ({"messages": [{"role": "user"}]}, "messages.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.content.type"),
    ({"messages": [USER], "n": 0}, "n"),
    ({"messages": [USER], "temperature": 3}, "temperature"),
    ({"messages": [USER], "algorithm": "beam"}, "algorithm"),
    ({"messages": [USER], "prompt": "x"}, "prompt"),
    ({"messages": [USER], "stream_options": {"include_usage": "often"}}, "stream_options.include_usage"),
])
def test_bad_chat_requests_name_the_field(body, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**body)
    err = validation_error(info.value.errors())
    assert (err.status, err.param) == (422, param), err.body()
    assert err.body()["error"]["message"].startswith(param) and err.body()["error"]["type"] == "invalid_request_error"


def test_chat_payload_shares_the_completion_fields():
    cfg = ServeConfig(checkpoint="/x", default_steps=32, default_transparency="linear")
    req = ChatCompletionRequest(messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "To "},
                                                                       {"type": "text", "text": "be?"}]}],
                                n=2, stop="!", algorithm="confidence", soft_mask=False)
    p = request_payload(req, cfg, "chatcmpl-1")
    assert p["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    assert p["prompts"] == [] and (p["n"], p["stop"], p["steps"], p["algorithm"]) == (2, ["!"], 32, "confidence")
    assert p["soft_mask"] is False and p["transparency"] == "linear"


def test_plain_template_is_user_assistant_lines():
    messages = [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Aye."},
                {"role": "user", "content": "Why?"}]
    assert PLAIN_TEMPLATE.render(messages) == "System: Be brief.\nUser: To be?\nAssistant: Aye.\nUser: Why?\nAssistant:"
    assert PLAIN_TEMPLATE.stop == ("\nUser:",)


def _bpe_folder(path, chat_template: str | None):
    from models.tokenizer import load_tokenizer, train_bpe

    train_bpe(LINES * 4, 320).save(path)
    if chat_template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return load_tokenizer(path)


def test_the_tokenizers_own_chat_template_renders_with_its_special_tokens(tmp_path):
    template = ("{% for m in messages %}<|pad|>{{ m.role }}\n{{ m.content }}<|endoftext|>{% endfor %}"
                "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}")
    tok = _bpe_folder(tmp_path / "hf", template)
    chat = ChatTemplate.load(tok, tmp_path / "hf")
    assert chat.name == "tokenizer" and chat.stop == []
    text = chat.render([USER])
    assert text == "<|pad|>user\nTo be?<|endoftext|><|pad|>assistant\n"
    ids = chat.encode([USER])
    # the template's markers are single special tokens; the same text encoded as plain text would split them
    assert ids.count(tok.eos_id) == 1 and ids.count(tok.pad_id) == 2 and tok.decode(ids) == text
    assert tok.eos_id not in tok.encode(text)


def test_a_tokenizer_without_a_template_gets_the_plain_one(tmp_path):
    tok = _bpe_folder(tmp_path / "bpe", None)
    chat = ChatTemplate.load(tok, tmp_path / "bpe")
    assert chat.name == "plain" and chat.stop == ["\nUser:"]
    assert chat.encode([USER]) == tok.encode("User: To be?\nAssistant:")
    assert ChatTemplate.load(tok, None).name == "plain"  # a named tokenizer (gpt2) has no folder


FINAL = {"id": "chatcmpl-1", "object": "text_completion", "created": 1, "model": "m", "nfe": 4, "steps": 4,
         "choices": [{"index": 0, "text": "Aye", "finish_reason": "stop", "logprobs": None},
                     {"index": 1, "text": "Nay, sir", "finish_reason": "length", "logprobs": None}],
         "usage": {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}}


def test_chat_response_and_chunks_carry_the_same_reply():
    full = chat_response(FINAL)
    assert full["object"] == "chat.completion" and full["nfe"] == 4
    assert [(c["message"], c["finish_reason"]) for c in full["choices"]] == [
        ({"role": "assistant", "content": "Aye"}, "stop"), ({"role": "assistant", "content": "Nay, sir"}, "length")]
    chunks = ChatChunks("chatcmpl-1", "m", n=2, include_usage=True)
    step = {"type": "step", "data": {"step": 2, "steps": 4, "choices": [{"index": 0, "text": "A_"},
                                                                        {"index": 1, "text": "N___"}]}}
    frames = chunks.opening() + chunks.frames(step) + chunks.frames({"type": "final", "data": FINAL})
    assert all(f["object"] == "chat.completion.chunk" and f["id"] == "chatcmpl-1" for f in frames)
    content, reasons, roles = {0: "", 1: ""}, {}, {}
    for f in frames:
        for c in f["choices"]:
            content[c["index"]] += c["delta"].get("content") or ""
            roles.setdefault(c["index"], c["delta"].get("role"))
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert content == {0: "Aye", 1: "Nay, sir"} and reasons == {0: "stop", 1: "length"}
    assert roles == {0: "assistant", 1: "assistant"}
    assert frames[2]["step"] == 2 and frames[2]["choices"][1]["partial"] == "N___"
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["total_tokens"] == 11
