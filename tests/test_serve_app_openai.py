"""The official `openai` client against the real Serve app of test_serve_app.py (the shared `serve_server`): chat
completions (plain and streamed, n > 1, stop, 4xx as the client's own exceptions), completions, and the API key of a
second app on the same Serve instance (401 without / with a wrong key, 200 with the right one)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "To be, or not to be?"}]
DIFFUSION = {"steps": 8, "algorithm": "confidence", "transparency": "linear"}


@pytest.fixture
def client(serve_server):
    import openai

    return openai.OpenAI(base_url=f"{serve_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_is_the_next_assistant_turn(client):
    reply = client.chat.completions.create(model="debug", messages=CHAT, max_tokens=16, seed=3, temperature=0.9,
                                           top_p=0.95, extra_body=DIFFUSION)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "debug"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    # the diffusion fields reached the sampler and came back
    extra = reply.model_extra
    assert (extra["steps"], extra["algorithm"], extra["transparency"], extra["seed"]) == (8, "confidence", "linear", 3)
    assert 1 <= extra["nfe"] <= 8
    # the prompt is the plain template (the test tokenizer has no chat template): the same text as a completion
    assert client.models.list().data[0].model_extra["chat_template"] == "plain"
    prompt = "System: Speak as Hamlet.\nUser: To be, or not to be?\nAssistant:"
    same = client.completions.create(model="debug", prompt=prompt, max_tokens=16, seed=3, temperature=0.9,
                                     top_p=0.95, stop=["\nUser:"], extra_body=DIFFUSION)
    assert same.choices[0].text == choice.message.content
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens > 10


def test_chat_stream_assembles_into_the_reply(client):
    body = dict(model="debug", messages=CHAT, max_tokens=16, seed=5, n=2, extra_body={"steps": 8})
    full = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert chunks and all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content, reasons, roles = {0: "", 1: ""}, {}, {}
    for chunk in chunks:
        for c in chunk.choices:
            content[c.index] += c.delta.content or ""
            roles.setdefault(c.index, c.delta.role)
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert content == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    steps = [c for c in chunks if c.model_extra.get("step") is not None]
    assert steps and "_" in steps[0].choices[0].model_extra["partial"]  # denoising progress: masked positions
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_n_and_stop(client):
    base = dict(model="debug", messages=CHAT, max_tokens=24, seed=7, extra_body={"steps": 8})
    many = client.chat.completions.create(**base, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.model_extra["batch_rows"] == 3
    assert len({c.message.content for c in many.choices}) > 1
    text = many.choices[0].message.content
    assert len(text) >= 6, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(**base, n=3, stop=["\u0000never", stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (text[:text.find(stop)], "stop")


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.content"),
    ({"messages": CHAT, "n": 5}, "n"),
    ({"messages": CHAT, "max_tokens": 201}, "max_tokens"),
    ({"messages": CHAT, "extra_body": {"algorithm": "beam"}}, "algorithm"),
    ({"messages": CHAT, "extra_body": {"stream_options": {"include_usage": True}}}, "stream_options"),
])
def test_bad_chat_requests_raise_the_clients_4xx_error(client, body, param):
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as info:  # our convention: 422 for a bad field
        client.chat.completions.create(model="debug", **body)
    err = info.value
    assert err.status_code == 422 and err.body["param"] == param and err.body["message"].startswith(param), err.body


def test_chat_context_overflow_is_a_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "summer " * 60}],
                                       max_tokens=200)
    assert info.value.body["param"] == "max_tokens" and info.value.body["code"] == "context_length_exceeded"


def test_completions_still_work_through_the_client(client):
    out = client.completions.create(model="debug", prompt=["To be", "Now is"], max_tokens=8, n=2, seed=1,
                                    extra_body={"steps": 4, "soft_mask": False})
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.text for c in out.choices) and out.model_extra["soft_mask"] is False
    assert out.usage.prompt_tokens >= 2 * 2  # both prompts (>= 1 token each, n = 2) reached the sampler
    chunks = list(client.completions.create(model="debug", prompt="To be", max_tokens=8, seed=1, stream=True,
                                            extra_body={"steps": 4}))
    assert chunks[-1].object == "text_completion" and chunks[-1].choices[0].text


def test_an_api_key_guards_every_endpoint_but_health(serve_server, serve_checkpoint, tmp_path):
    """A second app with a key file on the same Serve instance: the client without / with a wrong key gets 401 in the
    API's error shape (openai.AuthenticationError), with the key 200; /healthz stays open for probes."""
    import urllib.request

    import openai

    from test_serve_app import post
    from pipelines.serve import ServeStageConfig, run, shutdown

    key_file = tmp_path / "api-key"
    key_file.write_text("sk-softmask-test-7c1d\n")
    cfg = ServeStageConfig(checkpoint=str(serve_checkpoint), model_name="debug", app_name="softmask-keyed",
                           route_prefix="/keyed", port=serve_server.port, api_key_file=str(key_file), num_cpus=0.25,
                           ingress_num_cpus=0.05, torch_threads=1, default_steps=4, default_max_tokens=8)
    keyed = run(cfg)
    try:
        assert keyed.key_source == f"$(head -n1 {key_file})" and "sk-softmask" not in keyed.example_curl()
        with urllib.request.urlopen(f"{keyed.url}/healthz", timeout=30) as r:
            assert r.status == 200
        wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
        for call in (lambda: wrong.chat.completions.create(model="debug", messages=CHAT),
                     lambda: wrong.completions.create(model="debug", prompt="To be"), wrong.models.list):
            with pytest.raises(openai.AuthenticationError) as info:
                call()
            assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
            assert info.value.body["message"] == "incorrect API key"
        # no Authorization header at all (the client always sends one): 401 in the same shape, before the body is read
        status, out, headers = post(f"{keyed.url}/v1/chat/completions", {"messages": CHAT})
        assert status == 401 and out["error"]["code"] == "invalid_api_key" and out["error"]["message"].startswith(
            "missing API key") and headers.get("www-authenticate") == "Bearer"
        good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-softmask-test-7c1d", max_retries=0, timeout=60)
        assert good.chat.completions.create(model="debug", messages=CHAT).choices[0].message.content
        assert good.models.list().data[0].id == "debug"
    finally:
        shutdown(keyed)
