"""Shared fixtures. Real components only: a real local Ray, a real S3 server on 127.0.0.1."""
from __future__ import annotations

import os

import pytest


# One auth mode for the whole test process, fixed before anything imports ray: Ray reads RAY_AUTH_MODE on the client
# side at import but passes the environment to the GCS it starts, so a later change would make a local Ray reject its
# own driver. Tests that talk to a token-auth cluster (test_cluster.py) run their drivers as subprocesses.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session; sets AWS_* env (before Ray starts)."""
    from infra.s3 import LocalS3Server

    server = LocalS3Server(tmp_path_factory.mktemp("s3data"))
    server.start()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One real local Ray for the session, sized to the machine's real core count.

    Depends on s3_server so that the S3 endpoint/credentials are in the environment before Ray starts.
    """
    import ray

    from infra.ray_runtime import RayConfig, init_ray

    started = init_ray(RayConfig(num_cpus=os.cpu_count()))
    yield ray
    if started:
        try:
            from ray import serve
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ serving app
# One Serve deployment for every test that asks for `serve_server` (test_serve_app.py, test_serve_app_openai.py);
# it is shut down right after the last of them, so the tests after it get the whole machine back.
_SERVE_CLOSE = pytest.StashKey()
_LAST_SERVE_USER = pytest.StashKey()


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    from serve_support import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("serve") / "debug-ckpt")


@pytest.fixture(scope="session")
def serve_server(request, ray_session, s3_server, serve_checkpoint, tmp_path_factory):
    """The app deployed by pipelines.serve.run from an s3:// copy of the checkpoint (serve_support.shared_app_config)."""
    from pipelines.serve import run, shutdown
    from serve_support import shared_app_config

    s3_server.create_bucket("serve-test")
    client = s3_server.client()
    for f in serve_checkpoint.iterdir():
        client.upload_file(str(f), "serve-test", f"ckpt/{f.name}")
    result = run(shared_app_config("s3://serve-test/ckpt", str(tmp_path_factory.mktemp("ckpt-cache"))))
    closed = []

    def close() -> None:
        if not closed:
            closed.append(True)
            shutdown(result)

    request.config.stash[_SERVE_CLOSE] = close
    try:
        yield result
    finally:
        close()


def pytest_collection_finish(session):
    users = [item for item in session.items if "serve_server" in getattr(item, "fixturenames", ())]
    session.config.stash[_LAST_SERVE_USER] = users[-1] if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item is item.config.stash.get(_LAST_SERVE_USER, None):
        close = item.config.stash.get(_SERVE_CLOSE, None)
        if close is not None:
            close()


@pytest.fixture(scope="module")
def sampling_model():
    """A random debug model (vocabulary 200) whose SM head matters: ω_s ≈ 0.88, ω_b ≈ −6 (λ large even for the flat
    prediction of a random model, H ≈ 5.3). For the sampler tests."""
    import torch

    import models

    torch.manual_seed(0)
    m = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=200))
    with torch.no_grad():
        m.sm_head.raw_scale.fill_(2.0)
        m.sm_head.raw_centre.fill_(6.0)
    return m.eval()
