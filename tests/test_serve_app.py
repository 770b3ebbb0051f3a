"""Serving stage end to end: real Ray Serve, real HTTP on 127.0.0.1, a debug checkpoint read from S3.

One app (2 sampler replicas, batching 8, short timeout, small queue; tests/serve_support.py) shared with the OpenAI
client tests of test_serve_app_openai.py. The CLI contract is in tests/test_serve_cli.py.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_support import APP, write_checkpoint  # noqa: F401  (re-exported for test_serve_cli)

pytestmark = pytest.mark.slow


def post(url: str, body, timeout: float = 60.0) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            out = json.loads(raw or b"{}")
        except ValueError:  # not our API's error body (e.g. the Serve proxy's own plain-text reply)
            out = {"raw": raw.decode(errors="replace")[:500]}
        return e.code, out, dict(e.headers)


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def stream_events(url: str, body: dict) -> list:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture
def checkpoint(serve_checkpoint):
    return serve_checkpoint


@pytest.fixture
def server(serve_server):
    """The module's app (tests/serve_support.py), shared with test_serve_app_openai.py: one deployment for both."""
    return serve_server


def test_health_models_openapi(server):
    assert get(f"{server.url}/healthz") == (200, {"status": "ok", "model": "debug"})
    status, models_list = get(f"{server.url}/v1/models")
    assert status == 200 and models_list["data"][0]["id"] == "debug" and models_list["data"][0]["max_seq_len"] == 256
    head = models_list["data"][0]["soft_mask"]  # the served SM head, as write_checkpoint set it
    assert abs(head["omega_s"] - 0.8808) < 1e-3 and abs(head["omega_b"] + 10.0) < 1e-3 and head["k"] == 3, head
    _, spec = get(f"{server.url}/openapi.json")
    assert {"/v1/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "steps", "algorithm", "soft_mask", "block_length", "stream"} <= set(props)

    def member(name: str, kind: str) -> dict:
        return next(m for m in [props[name], *props[name].get("anyOf", [])] if m.get("type") == kind)

    # the schema states what the server enforces, the configured bounds included
    assert member("max_tokens", "integer")["maximum"] == 200 and member("n", "integer")["maximum"] == 4
    assert member("steps", "integer")["maximum"] == 1024
    assert (member("prompt", "array")["minItems"], member("prompt", "array")["maxItems"]) == (1, 3)  # max_prompts
    assert "minLength" not in member("prompt", "string")  # "" is unconditional generation
    assert member("stop", "string")["minLength"] == 1 and member("stop", "array")["maxItems"] == 2  # max_stop
    assert member("model", "string")["enum"] == ["debug"]


def test_every_schema_edge_is_answered_as_the_schema_says(server):
    """Each field of /openapi.json's CompletionRequest on and just past every bound it states, over real HTTP: the
    schema-valid requests are served (200), the others refused with a 4xx naming that field."""
    from schema_edges import edge_requests

    _, spec = get(f"{server.url}/openapi.json")
    cases = edge_requests(spec, "CompletionRequest", {"prompt": "To be", "max_tokens": 4, "steps": 2, "seed": 0})
    wrong = []
    for name, body, valid in cases:
        req = urllib.request.Request(server.completions_url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()  # the whole body: JSON, or the events of a stream
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        param = json.loads(raw)["error"]["param"] if status >= 400 else None
        if (status == 200) != valid or (not valid and not (400 <= status < 500 and param == name)):
            wrong.append((name, body, valid, status, raw[:300]))
    assert not wrong, wrong


def test_empty_prompt_is_unconditional_generation(server):
    body = {"prompt": "", "max_tokens": 16, "steps": 8, "seed": 2}
    status, out, _ = post(server.completions_url, body)
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == 0 and out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 16 or out["choices"][0]["finish_reason"] == "stop"
    status, out, _ = post(server.completions_url, {**body, "prompt": ["", "To be"]})
    assert status == 200 and len(out["choices"]) == 2 and all(c["text"] for c in out["choices"]), out


def test_completion_is_deterministic_with_seed(server):
    body = {"model": "debug", "prompt": "Shall I compare thee", "max_tokens": 24, "steps": 12, "seed": 7}
    status, first, _ = post(server.completions_url, body)
    assert status == 200, first
    choice = first["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert 1 <= first["nfe"] <= 12 and first["seed"] == 7 and first["batch_size"] == 1
    assert first["usage"]["prompt_tokens"] > 0
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    _, again, _ = post(server.completions_url, body)
    assert again["choices"][0]["text"] == choice["text"]
    _, other, _ = post(server.completions_url, {**body, "seed": 8})
    assert other["choices"][0]["text"] != choice["text"]


def test_stop_strings_cut_the_completion(server):
    """The same seeded request with `stop`: the text ends right before the first occurrence of the earliest stop
    string, finish_reason "stop"; a stop string that does not occur changes nothing."""
    body = {"prompt": "Shall I compare thee", "max_tokens": 32, "steps": 12, "seed": 7}
    status, plain, _ = post(server.completions_url, body)
    text = plain["choices"][0]["text"]
    assert status == 200 and len(text) >= 6, plain
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text[:text.find(stop)]
    status, out, _ = post(server.completions_url, {**body, "stop": ["\u0000never", stop]})
    assert status == 200, out
    assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (cut, "stop") and len(cut) < len(text)
    _, single, _ = post(server.completions_url, {**body, "stop": stop})  # a string, not a list
    assert single["choices"][0]["text"] == cut
    _, absent, _ = post(server.completions_url, {**body, "stop": "\u0000never"})
    assert absent["choices"][0] == plain["choices"][0]


def test_request_limits_name_the_field_and_the_limit_itself_is_served(server):
    """max_prompts=3 and max_stop=2 in this app: one more is a 422 naming the field; exactly the limit is served."""
    base = {"max_tokens": 8, "steps": 4, "seed": 1}
    status, out, _ = post(server.completions_url, {**base, "prompt": ["To be", "or not", "to be", "that is"]})
    assert (status, out["error"]["param"]) == (422, "prompt"), out
    assert out["error"]["message"] == "prompt: number of prompts 4 exceeds the server limit 3"
    status, out, _ = post(server.completions_url, {**base, "prompt": "To be", "stop": ["a", "b", "c"]})
    assert (status, out["error"]["param"]) == (422, "stop"), out
    assert out["error"]["message"] == "stop: number of stop strings 3 exceeds the server limit 2"
    status, out, _ = post(server.completions_url, {**base, "prompt": ["To be", "or not", "to be"], "stop": ["a", "b"]})
    assert status == 200 and len(out["choices"]) == 3, out


def test_soft_mask_on_and_off_both_serve(server):
    base = {"prompt": ["To be, or not to be", "Now is the winter"], "n": 2, "max_tokens": 24, "steps": 12,
            "seed": 3, "algorithm": "confidence"}
    outs, fed = {}, {}
    for sm in (True, False):
        status, out, _ = post(server.completions_url, {**base, "soft_mask": sm})
        assert status == 200, out
        assert out["soft_mask"] is sm and len(out["choices"]) == 4 and out["batch_rows"] == 4
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        outs[sm] = [c["text"] for c in out["choices"]]
        fed[sm] = out["sm_feedback"]
    assert outs[True] != outs[False]  # same seed, different feedback -> different samples
    # the head opened wide (write_checkpoint): λ ≈ ω_s ≈ 0.88 wherever it fed, every gate open; no feedback when off
    assert fed[False] is None and 0.8 < fed[True]["lambda_mean"] <= 0.881 and fed[True]["gate_open"] == 1.0, fed
    status, out, _ = post(server.completions_url, {**base, "soft_mask": True, "transparency": "stepwise"})
    assert status == 200 and len(out["choices"]) == 4 and out["transparency"] == "stepwise", out
    assert [c["text"] for c in out["choices"]] != outs[True]  # the schedule reached the sampler
    status, out, _ = post(server.completions_url, {**base, "algorithm": "remdm_loop"})
    assert status == 200 and len(out["choices"]) == 4 and all(c["text"] for c in out["choices"]), out
    # threshold decoding reaches the sampler: a threshold every position passes decodes each block in one forward
    fast = {**base, "algorithm": "threshold", "threshold": 1e-9, "block_length": 8}
    for cache in ("none", "prefix", "dual"):
        status, out, _ = post(server.completions_url, {**fast, "cache": cache})
        assert status == 200 and all(c["text"] for c in out["choices"]), out
        assert out["nfe"] == -(-out["length"] // 8) < base["steps"], out


def test_streaming_steps_then_final_text(server):
    body = {"prompt": "Rough winds do shake", "max_tokens": 24, "steps": 8, "seed": 11}
    events = stream_events(server.completions_url, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    steps = [e for e in events[:-1] if e["object"] == "text_completion.step"]
    final = events[-2]
    assert len(steps) >= 2 and [e["step"] for e in steps] == sorted({e["step"] for e in steps})
    assert "_" in steps[0]["choices"][0]["text"]  # early steps still show masked positions
    assert final["object"] == "text_completion" and final["nfe"] == len(steps) <= 8
    _, plain, _ = post(server.completions_url, body)
    assert final["choices"][0]["text"] == plain["choices"][0]["text"]
    _, traced, _ = post(server.completions_url, {**body, "return_trajectory": True})
    assert len(traced["choices"][0]["trajectory"]) == len(steps)


def test_concurrent_requests_share_a_batch(server):
    """Requests that differ only in temperature / top_p / threshold are decoded together (each of the 16 has its own
    threshold, so any batch of two or more mixed settings); another step count never joins them."""
    body = {"prompt": "Now is the winter of our discontent", "max_tokens": 16, "steps": 8, "algorithm": "threshold",
            "block_length": 8}
    odd = {**body, "steps": 6}  # another key: never decoded with the others
    mixed = [{**body, "threshold": 0.05 * (i + 1), "temperature": (0.0, 0.7, 1.0)[i % 3], "top_p": (1.0, 0.9)[i % 2]}
             for i in range(16)]
    with ThreadPoolExecutor(17) as pool:
        futures = [pool.submit(post, server.completions_url, b) for b in mixed]
        odd_future = pool.submit(post, server.completions_url, odd)
        results = [f.result() for f in futures]
    assert all(s == 200 for s, _, _ in results), [r[1] for r in results if r[0] != 200]
    sizes = [out["batch_size"] for _, out, _ in results]
    assert max(sizes) > 1, sizes
    assert all(out["seed"] is None for _, out, _ in results if out["batch_size"] > 1)
    status, odd_out, _ = odd_future.result()
    assert status == 200 and odd_out["batch_size"] == 1 and odd_out["steps"] == 6 and 1 <= odd_out["nfe"] <= 6


MALFORMED = [
    ({"prompt": []}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"max_tokens": 8}, 422, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "a", "max_tokens": "many"}, 422, "max_tokens"),
    ({"prompt": "a", "max_tokens": 100000}, 422, "max_tokens"),
    ({"prompt": "a", "steps": 0}, 422, "steps"),
    ({"prompt": "a", "steps": 10 ** 6}, 422, "steps"),
    ({"prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "a", "n": 0}, 422, "n"),
    ({"prompt": "a", "n": 50}, 422, "n"),
    ({"prompt": "a", "algorithm": "beam"}, 422, "algorithm"),
    ({"prompt": "a", "soft_mask": "maybe"}, 422, "soft_mask"),
    ({"prompt": "a", "transparency": "cosine"}, 422, "transparency"),
    ({"prompt": "a", "threshold": 0}, 422, "threshold"),
    ({"prompt": "a", "threshold": 1.5}, 422, "threshold"),
    ({"prompt": "a", "cache": "everything"}, 422, "cache"),
    ({"prompt": "a", "seed": -3}, 422, "seed"),
    ({"prompt": "a", "stop": [""]}, 422, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"prompt": ["a"] * 17}, 422, "prompt"),
    ({"prompt": "a", "block_length": 201}, 422, "block_length"),
    ({"prompt": "a", "frequency_penalty": 1}, 422, "frequency_penalty"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    (b"{not json", 400, "body"),
    (b"[1, 2]", 422, "body"),
    ({"prompt": "summer " * 200}, 413, "prompt"),
    ({"prompt": "summer " * 80, "max_tokens": 200}, 400, "max_tokens"),
    ({"prompt": "x" * (70 * 1024)}, 413, "body"),
]


@pytest.mark.parametrize("body, status, param", MALFORMED, ids=[f"{m[1]}-{m[2]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_4xx_naming_the_field(server, body, status, param):
    got, out, _ = post(server.completions_url, body)
    assert (got, out["error"]["param"]) == (status, param), out
    assert out["error"]["message"].startswith(param)


def test_timeout_and_overload_leave_the_replicas_serving(server):
    """Slow requests fill both replicas (2 x 8 ongoing) until their 6 s timeout; a burst on top of the 24 queue slots
    is refused with 503 at once; the timed-out decodes are aborted and the replicas serve again."""
    # seeded: each decodes on its own; ReMDM remasks every step, so no step is skipped by the unchanged-input cache
    slow = {"prompt": "To be", "max_tokens": 200, "steps": 1024, "seed": 5, "algorithm": "remdm_cap"}
    light = {"prompt": "To be", "steps": 8, "max_tokens": 16}
    with ThreadPoolExecutor(16 + 48) as pool:
        t0 = time.monotonic()
        slow_futures = [pool.submit(post, server.completions_url, slow) for _ in range(16)]
        time.sleep(1.5)  # let the slow ones occupy every replica slot
        burst = [pool.submit(post, server.completions_url, light) for _ in range(48)]
        slow_results = [f.result() for f in slow_futures]
        slow_wall = time.monotonic() - t0
        results = [f.result() for f in burst]
    assert all(s == 504 and out["error"]["code"] == "timeout" for s, out, _ in slow_results), slow_results[0]
    assert slow_wall < 6.0 + 8.0, slow_wall  # the timeout holds even with a full queue
    codes = sorted(s for s, _, _ in results)
    assert set(codes) <= {200, 503, 504} and codes.count(503) >= 1, codes
    refused = [(out, {k.lower(): v for k, v in h.items()}) for s, out, h in results if s == 503]
    assert all(out["error"]["code"] == "overloaded" and h.get("retry-after") == "1" for out, h in refused), refused[0]
    t1 = time.monotonic()
    status, out, _ = post(server.completions_url, {"prompt": "Shall I", "seed": 1})  # aborted decodes freed the replica
    assert status == 200 and out["choices"][0]["text"] and time.monotonic() - t1 < 5.0


def deployment_config(app: str, deployment: str) -> dict:
    """The deployment's config as the Serve controller holds it (what `serve status`/the dashboard report)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details["applications"][app]["deployments"][deployment]["deployment_config"]


def running(app: str, deployment: str = "SoftmaskSampler") -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def test_autoscaling_config_is_applied(server):
    sampler = deployment_config(APP, "SoftmaskSampler")
    auto = sampler["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (2, 3, 2)
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"], auto["target_ongoing_requests"]) == (60, 30, 16)
    assert (sampler["max_ongoing_requests"], sampler["max_queued_requests"]) == (8, 24)
    assert sampler["ray_actor_options"]["num_cpus"] == 0.25
    ingress = deployment_config(APP, "SoftmaskIngress")
    assert ingress["num_replicas"] == 1 and ingress["ray_actor_options"]["num_cpus"] == 0.05
    assert running(APP) == 2 and running(APP, "SoftmaskIngress") == 1  # min_replicas


def test_sampler_scales_up_under_load(server, checkpoint):
    """A second app (1 to 2 sampler replicas, one ongoing request per replica as the target, 1 s upscale delay) on the
    same Serve instance: under 8 concurrent clients a second replica starts, and no request fails meanwhile."""
    import threading

    from pipelines.serve import ServeStageConfig, run, shutdown

    app = "softmask-scale"
    cfg = ServeStageConfig(
        checkpoint=str(checkpoint), model_name="debug", app_name=app, route_prefix="/scale", port=server.port,
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=600,
        num_cpus=0.25, ingress_num_cpus=0.05, max_batch_size=1, request_timeout_s=300.0, torch_threads=1)
    scaled = run(cfg)
    stop, codes = threading.Event(), []

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                code = post(scaled.completions_url, {"prompt": "To be", "max_tokens": 16, "steps": 16, "seed": i},
                            timeout=400)[0]
            except Exception as e:  # noqa: BLE001 - recorded: the test fails on anything but 200
                code = f"{type(e).__name__}: {e}"
            codes.append(code)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    try:
        assert running(app) == 1
        assert deployment_config(app, "SoftmaskSampler")["autoscaling_config"]["max_replicas"] == 2
        for t in threads:
            t.start()
        deadline = time.monotonic() + 600  # a new replica is a new Ray worker process: slow on a loaded machine
        while running(app) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running(app) == 2, serve_status_line(app)
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(300)
        shutdown(scaled)
    assert codes and set(codes) == {200}, sorted(set(map(str, codes)))


def serve_status_line(app: str) -> str:
    from ray import serve

    return str(serve.status().applications[app].deployments["SoftmaskSampler"])
