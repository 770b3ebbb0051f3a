"""Serving stage without Ray: typed config validation, request schema -> 4xx mapping, S3 checkpoint cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.config import ConfigError, field_docs, from_dict, load_config
from pipelines.serve import ServeStageConfig
from workers.serving import request_payload
from workers.serving_config import ServeConfig, resolve_checkpoint
from workers.serving_api import ApiError, CompletionRequest, check_bounds, validation_error
from workers.serving_chat import ChatCompletionRequest

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_loads_and_every_field_is_documented():
    cfg = load_config(ServeStageConfig, ROOT / "configs" / "serve_debug.yaml", ["checkpoint=/x/ckpt", "port=0"])
    assert cfg.host == "127.0.0.1" and cfg.port == 0 and cfg.served_name == "softmask-debug"
    docs = field_docs(ServeStageConfig)
    assert {"checkpoint", "max_batch_size", "min_replicas", "request_timeout_s", "host", "detach"} <= set(docs)
    assert all(docs.values()), [k for k, v in docs.items() if not v]


@pytest.mark.parametrize("override, field", [
    ({"checkpoint": ""}, "checkpoint"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"max_ongoing_requests": 4, "max_batch_size": 8}, "max_ongoing_requests"),
    ({"default_algorithm": "beam"}, "default_algorithm"),
    ({"default_top_p": 0.0}, "default_top_p"),
    ({"default_transparency": "cosine"}, "default_transparency"),
    ({"default_steps": 5000}, "default_steps"),
    ({"route_prefix": "v1"}, "route_prefix"),
    ({"host": ""}, "host"),
    ({"api_key_env": ""}, "api_key_env"),
    ({"detach": True}, "detach"),
    ({"port": 70000}, "port"),
    ({"max_batch_size": "many"}, "max_batch_size"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_config_errors_name_the_field(override, field, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = {"checkpoint": "/x/ckpt", **override}
    with pytest.raises(ConfigError, match=field):
        from_dict(ServeStageConfig, data)


def test_schema_errors_map_to_status_and_field():
    cases = [({"prompt": []}, 422, "prompt"), ({"prompt": ["a", 5]}, 422, "prompt"), ({}, 422, "prompt"),
             ({"prompt": "a", "temperature": 3}, 422, "temperature"), ({"prompt": "a", "top_p": 0}, 422, "top_p"),
             ({"prompt": "a", "algorithm": "beam"}, 422, "algorithm"), ({"prompt": "a", "x": 1}, 422, "x"),
             ({"prompt": "a", "stop": [""]}, 422, "stop"), ({"prompt": "a", "seed": -1}, 422, "seed")]
    for body, status, param in cases:
        with pytest.raises(ValidationError) as info:
            CompletionRequest(**body)
        err = validation_error(info.value.errors())
        assert (err.status, err.param) == (status, param), (body, err.body())
        assert err.body()["error"]["message"].startswith(param)


def test_bounds_and_defaults():
    cfg = ServeConfig(checkpoint="/x/ckpt", max_tokens_limit=64, max_n=2, default_steps=32, default_soft_mask=False)
    with pytest.raises(ApiError) as info:
        check_bounds(CompletionRequest(prompt="a", max_tokens=65), cfg.limits())
    assert (info.value.status, info.value.param) == (422, "max_tokens")
    with pytest.raises(ApiError) as info:
        check_bounds(CompletionRequest(prompt="a", n=3), cfg.limits())
    assert info.value.param == "n"
    with pytest.raises(ApiError) as info:
        check_bounds(CompletionRequest(prompt="a", model="other"), cfg.limits())
    assert (info.value.status, info.value.param) == (404, "model")
    p = request_payload(CompletionRequest(prompt=["a", "b"], soft_mask=True, stop="\n"), cfg, "id")
    assert p["prompts"] == ["a", "b"] and p["steps"] == 32 and p["soft_mask"] is True and p["stop"] == ["\n"]
    assert request_payload(CompletionRequest(prompt="a"), cfg, "id")["soft_mask"] is False
    with pytest.raises(ApiError) as info:
        check_bounds(CompletionRequest(prompt="a", block_length=65), cfg.limits())
    assert info.value.param == "block_length"
    # a block longer than the completion: one block; as long: semi-AR blocks of that length
    assert request_payload(CompletionRequest(prompt="a", max_tokens=8, block_length=16), cfg, "id")["block_length"] \
        is None
    assert request_payload(CompletionRequest(prompt="a", max_tokens=8, block_length=8), cfg, "id")["block_length"] == 8
    p = request_payload(CompletionRequest(prompt=["", "To be"]), cfg, "id")  # "" = unconditional generation
    assert p["prompts"] == ["", "To be"]


def test_the_served_schema_states_what_the_server_enforces():
    """Every field on and just past each bound of the OpenAPI schema the app publishes (configured bounds and the
    served model name written in): schema-valid bodies pass the ingress's checks, the others fail naming that field."""
    from types import SimpleNamespace

    from schema_edges import edge_requests
    from workers.serving import build_fastapi

    cfg = ServeConfig(checkpoint="/x/ckpt", model_name="m", max_tokens_limit=64, max_steps=100, max_n=2,
                      max_prompts=3, max_stop=2)
    spec = build_fastapi(SimpleNamespace(cfg=cfg, api_key=None)).openapi()
    cases = [(CompletionRequest, case) for case in edge_requests(spec, "CompletionRequest",
                                                                 {"prompt": "a", "max_tokens": 8})]
    chat = edge_requests(spec, "ChatCompletionRequest", {"messages": [{"role": "user", "content": "a"}],
                                                         "max_tokens": 8})
    assert len(cases) > 60 and sum(valid for _, (*_, valid) in cases) > 30 and len(chat) > 50
    for kind, (name, body, valid) in cases + [(ChatCompletionRequest, case) for case in chat]:
        try:
            req = kind.model_validate(body)
            check_bounds(req, cfg.limits())
            request_payload(req, cfg, "id")
            error = None
        except ValidationError as e:
            error = validation_error(e.errors())
        except ApiError as e:
            error = e
        assert (error is None) == valid, (name, body, error and error.body())
        assert error is None or (400 <= error.status < 500 and error.param.split(".")[0] == name), \
            (name, body, error.body())


def test_local_checkpoint_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        resolve_checkpoint(str(tmp_path / "missing"))


def test_s3_checkpoint_is_cached_and_refreshed(s3_server, tmp_path):
    s3_server.create_bucket("serve-cache")
    client = s3_server.client()
    files = {"config.json": json.dumps({"format_version": 1}), "model.safetensors": "weights-v1"}
    for name, text in files.items():
        client.put_object(Bucket="serve-cache", Key=f"ckpt/{name}", Body=text.encode())
    cache = tmp_path / "cache"
    first = resolve_checkpoint("s3://serve-cache/ckpt", cache)
    assert (first / "model.safetensors").read_text() == "weights-v1"
    stamp = (first / ".source.json").stat().st_mtime_ns
    assert resolve_checkpoint("s3://serve-cache/ckpt/", cache) == first  # cache hit: nothing re-downloaded
    assert (first / ".source.json").stat().st_mtime_ns == stamp
    client.put_object(Bucket="serve-cache", Key="ckpt/model.safetensors", Body=b"weights-v2-longer")
    again = resolve_checkpoint("s3://serve-cache/ckpt", cache)
    assert (again / "model.safetensors").read_text() == "weights-v2-longer"
    assert [p.name for p in cache.iterdir()] == [again.name]  # no temp/old dirs left behind
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_checkpoint("s3://serve-cache/nothing-here", cache)


# ------------------------------------------------------------------------------------------------ access
def test_the_key_comes_from_the_file_or_the_environment_and_never_shows(tmp_path, monkeypatch):
    from workers.serving_config import read_api_key

    secret = "sk-test-4f1c9e"
    monkeypatch.delenv("SOFTMASK_API_KEY", raising=False)
    assert read_api_key(ServeConfig(checkpoint="/x")) is None
    with pytest.raises(ConfigError, match="require_api_key: no API key found") as info:
        read_api_key(ServeConfig(checkpoint="/x", require_api_key=True))
    monkeypatch.setenv("SOFTMASK_API_KEY", f" {secret}\n")
    assert read_api_key(ServeConfig(checkpoint="/x", require_api_key=True)) == secret
    monkeypatch.setenv("OTHER_KEY", "other")
    assert read_api_key(ServeConfig(checkpoint="/x", api_key_env="OTHER_KEY")) == "other"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nsecond line\n")
    assert read_api_key(ServeConfig(checkpoint="/x", api_key_file=str(key_file))) == "from-file"  # before the env
    key_file.write_text("\n" + secret)
    with pytest.raises(ConfigError, match="api_key_file: .* holds no key") as info:
        read_api_key(ServeConfig(checkpoint="/x", api_key_file=str(key_file)))
    assert secret not in str(info.value)
    with pytest.raises(ConfigError, match="api_key_file: cannot read"):
        read_api_key(ServeConfig(checkpoint="/x", api_key_file=str(tmp_path / "missing")))
    from pipelines.serve import request_headers  # what the driver's own requests (the deploy stage) send

    assert request_headers(ServeConfig(checkpoint="/x"))["Authorization"] == f"Bearer {secret}"
    monkeypatch.delenv("SOFTMASK_API_KEY")
    assert request_headers(ServeConfig(checkpoint="/x")) == {"Content-Type": "application/json"}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::"])
def test_beyond_loopback_without_a_key_is_refused_before_anything_starts(host, monkeypatch):
    """preflight names the host before it reads the checkpoint (here missing) or touches Ray."""
    from pipelines.serve import preflight

    monkeypatch.delenv("SOFTMASK_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=f"host: {host} is not a loopback address: .* needs an API key"):
        preflight(ServeStageConfig(checkpoint="/x/missing-ckpt", host=host))
    monkeypatch.setenv("SOFTMASK_API_KEY", "k")  # with a key the host is fine; the missing checkpoint is next
    with pytest.raises(ConfigError, match="checkpoint"):
        preflight(ServeStageConfig(checkpoint="/x/missing-ckpt", host=host))


def test_cli_refuses_a_public_bind_without_a_key_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("SOFTMASK_API_KEY", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--config",
                           str(ROOT / "configs" / "serve_debug.yaml"), f"--checkpoint={tmp_path}", "--host=0.0.0.0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "host: 0.0.0.0 is not a loopback address" in lines[0] and "SOFTMASK_API_KEY" in lines[0], lines


def test_the_workflow_refuses_a_public_deploy_without_a_key_before_any_stage(monkeypatch):
    from pipelines.workflow import WorkflowConfig, preflight

    monkeypatch.delenv("SOFTMASK_API_KEY", raising=False)
    cfg = load_config(WorkflowConfig, ROOT / "configs" / "debug_cpu.yaml", ["serve.host=0.0.0.0"])
    assert "deploy" in cfg.stages
    with pytest.raises(ConfigError, match="serve.host: 0.0.0.0 is not a loopback address"):
        preflight(cfg, sources=False)
    monkeypatch.setenv("SOFTMASK_API_KEY", "k")
    preflight(cfg, sources=False)
