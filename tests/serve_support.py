"""The serving tests' shared app: a debug checkpoint with a tiny BPE, and the ServeStageConfig of the one deployment
that test_serve_app.py and test_serve_app_openai.py both talk to (the `serve_server` fixture of conftest.py)."""
from __future__ import annotations

from pathlib import Path

from infra.net import free_port

APP = "softmask-test"
# A few lines of real text (Shakespeare, public domain) for a tiny byte-level BPE.
LINES = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date;",
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles",
    "Now is the winter of our discontent Made glorious summer by this sun of York;",
]


def write_checkpoint(path: Path) -> Path:
    """Debug-flavour model + BPE tokenizer saved side by side (the layout the training stage exports)."""
    import torch

    import models
    from models.tokenizer import train_bpe

    tok = train_bpe(LINES * 4, 320)
    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig.from_flavor("debug", vocab_size=tok.vocab_size,
                                                              mask_token_id=tok.mask_id))
    with torch.no_grad():  # make soft-masking matter for the flat random model: ω_s ≈ 0.88, ω_b ≈ −10 -> λ ≈ ω_s
        model.sm_head.raw_scale.fill_(2.0)
        model.sm_head.raw_centre.fill_(10.0)
    models.save_pretrained(model, path)
    tok.save(path)
    return path


def shared_app_config(checkpoint_uri: str, cache_dir: str):
    """2 sampler replicas (3 at most), batching 8, a 6 s timeout and a 24-request queue: small enough to overload."""
    from pipelines.serve import ServeStageConfig

    return ServeStageConfig(
        checkpoint=checkpoint_uri, cache_dir=cache_dir, model_name="debug",
        app_name=APP, port=free_port(), min_replicas=2, max_replicas=3, upscale_delay_s=60, num_cpus=0.25,
        ingress_num_cpus=0.05, max_batch_size=8, max_ongoing_requests=8, batch_wait_timeout_s=0.2,
        max_queued_requests=24,
        request_timeout_s=6.0, max_prompt_tokens=96, max_tokens_limit=200, max_n=4, max_prompts=3, max_stop=2,
        max_body_bytes=64 * 1024, default_steps=8, default_max_tokens=16, torch_threads=1)
